"""Pipeline parallelism: a RecurrentLM as a DeepSpeed PipelineModule, trained with 1F1B.

    lm = RecurrentLM(c); apply_tensor_parallel(lm, ...)    # the other plans first
    pipe = pipeline_module(lm, mesh, balance="parameters")
    engine, *_ = deepspeed.initialize(model=pipe, ...)     # a PipelineEngine
    loss = engine.train_batch(iter(micro_batches))         # ((tokens, reset), (targets, mask)) each

The model becomes a list of n_layers + 3 layers; stage s runs a contiguous range of it:
    0          embedding    (tokens, reset) -> (x, reset)
    1 .. L     block i - 1  (x, reset) -> (x, reset)
    L + 1      final norm   (x, reset) -> x
    L + 2      head         x -> logits (this rank's vocabulary slice under tensor parallelism)
Between stages travel x (B, T, D) — T is this rank's chunk under context parallelism, T / tp
under sequence parallelism — and the reset flags as int64 (an integer tensor gets no gradient
and crosses gloo and NCCL alike). With tied embeddings the embedding is a TiedLayerSpec used
again by the head: DeepSpeed keeps the first and last stage's copies equal and sums their
gradients.

Each layer wraps the RecurrentLM's own module (the same Parameter objects), so a parameter's
pipeline name maps back to its RecurrentLM name (`lm_name`: checkpoints, export, resharding),
and the whole `lm` can be brought, up to date, to every rank's device for evaluation and
sampling (`full_model`); during training a stage keeps only its own layers there.

Mesh order: the DeepSpeed topology is (pipe, data, model) = (pp, dp x cp, tp), pipe outermost,
which is the order of ParallelMesh's ranks.
"""
from __future__ import annotations

import contextlib
import re

import torch
import torch.distributed as dist
from torch import nn

from megarnn.config import stage_bounds  # noqa: F401 (re-exported: the pipeline's stages)
from megarnn.ops.context import sequence_start
from megarnn.parallel.construct import dematerialize, materialize
from megarnn.parallel.plan import sequence_count

TIE_KEY = "embed"


class EmbedStage(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.embed_tokens = lm.embed_tokens
        self._lm = [lm]  # a list: not registered, so its parameters are not this layer's

    def forward(self, inputs):
        tokens, reset = inputs
        lm = self._lm[0]
        with _split_sequence(lm):
            reset, _ = lm.begin(tokens, None, reset.bool())
        return lm.embed(tokens), reset.long()


class BlockStage(nn.Module):
    def __init__(self, lm, i: int):
        super().__init__()
        self.layer, self.i, self._lm = lm.layers[i], i, [lm]

    def forward(self, inputs):
        x, reset = inputs
        lm = self._lm[0]
        T = reset.shape[1]  # this rank's chunk of time (x may hold T / tp under sequence parallelism)
        with _split_sequence(lm):
            pos = lm.positions(sequence_start(T), T, x.device)
        x, _ = lm.run_layer(self.i, x, reset.bool(), None, pos)
        return x, reset


def _split_sequence(lm):
    """The layout's context parallelism around a direct call of the model's pieces."""
    split = getattr(getattr(lm, "layout", None), "split_sequence", None)
    return split.active() if split is not None else contextlib.nullcontext()


class NormStage(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.final_norm = lm.final_norm

    def forward(self, inputs):
        x, _ = inputs
        return self.final_norm(x)


class HeadStage(nn.Module):
    """The untied output head; the tied one is `tied_head` on the embedding module."""

    def __init__(self, lm):
        super().__init__()
        self.lm_head, self._lm = lm.lm_head, [lm]

    def forward(self, x):
        return self._lm[0].logits(x)


def tied_head(embed: EmbedStage, x):
    return embed._lm[0].logits(x)


class PipelineLoss:
    """loss_fn of the last stage: the masked mean share of RecurrentLM.masked_loss over the
    whole sequences' tokens (summed over the cp group), x cp because DeepSpeed averages gradients
    over dp x cp (as the non-pipelined loop does)."""

    def __init__(self, lm, cp: int, cp_group=None):
        self.lm, self.cp, self.cp_group = lm, cp, cp_group

    def __call__(self, logits, labels):
        targets, mask = labels
        mask = mask.bool()
        return self.lm.masked_loss(logits, targets, mask, sequence_count(mask, self.cp_group)) * self.cp



def pipeline_module(lm, mesh, balance: str = "parameters", parts: list[int] | None = None):
    """The DeepSpeed PipelineModule of `lm` over mesh.pp stages (every rank calls this).
    parts: the stage bounds already decided (megarnn/parallel/construct.py), else DeepSpeed's."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import ProcessTopology

    n = len(lm.layers)
    bounds = parts if parts is not None else stage_bounds(balance, n, mesh.pp)

    class Pipe(PipelineModule):
        def _partition_layers(self, method="uniform"):
            if bounds is None:
                return super()._partition_layers(method)
            self.parts = bounds
            self._set_bounds(start=bounds[self.stage_id], stop=bounds[self.stage_id + 1])

    tied = lm.lm_head is None
    embed = (TiedLayerSpec(TIE_KEY, EmbedStage, lm, tied_weight_attr=["embed_tokens.weight"]) if tied
             else LayerSpec(EmbedStage, lm))
    head = (TiedLayerSpec(TIE_KEY, EmbedStage, lm, forward_fn=tied_head, tied_weight_attr=["embed_tokens.weight"])
            if tied else LayerSpec(HeadStage, lm))
    specs = [embed, *(LayerSpec(BlockStage, lm, i) for i in range(n)), LayerSpec(NormStage, lm), head]
    topo = ProcessTopology(axes=["pipe", "data", "model"], dims=[mesh.pp, mesh.dp * mesh.cp, mesh.tp])
    return Pipe(specs, topology=topo, loss_fn=PipelineLoss(lm, mesh.cp, mesh.group("cp") if mesh.cp > 1 else None),
                partition_method=balance if bounds is None else "explicit")


def lm_name(pipe_name: str, n_layers: int) -> str:
    """A PipelineModule parameter name (or a layer file's key prefixed by its layer index,
    "3.layer.mixer.w") -> the RecurrentLM name ("layers.2.mixer.w")."""
    if pipe_name.startswith(f"tied_modules.{TIE_KEY}."):
        return pipe_name[len(f"tied_modules.{TIE_KEY}."):]
    m = re.match(r"(\d+)\.(.*)", pipe_name)
    if m is None:
        raise ValueError(f"not a pipeline parameter name: {pipe_name!r}")
    idx, rest = int(m.group(1)), m.group(2)
    if 1 <= idx <= n_layers:
        return "layers." + str(idx - 1) + rest[len("layer"):]
    return rest  # embed_tokens.*, final_norm.*, lm_head.*


def _layer_of(name: str, n_layers: int) -> int:
    """The pipeline layer index that trains RecurrentLM parameter `name`."""
    if name.startswith("layers."):
        return int(name.split(".")[1]) + 1
    if name.startswith("embed_tokens."):
        return 0
    return n_layers + 1 if name.startswith("final_norm.") else n_layers + 2


def _owners(pipe, pp: int, tied: bool) -> dict[int, list[int]]:
    """{layer index: the stages holding it} (a tied embedding: the first and the last)."""
    owners: dict[int, list[int]] = {}
    for stage in range(pp):
        for idx in range(pipe.parts[stage], pipe.parts[stage + 1]):
            owners.setdefault(idx, []).append(stage)
    if tied:
        owners[0] = sorted({*owners[0], pp - 1})
    return owners


@torch.no_grad()
def sync_full_model(lm, pipe, mesh) -> None:
    """Bring every parameter of `lm` up to date on every rank from the stage that trains it.

    Each stage trains only its own layers; the rest of `lm` on that rank is a stale replica.
    Broadcasts go along the pipe group (same dp, cp and tp coordinates)."""
    if mesh.pp == 1:
        return
    group = mesh.group("pp")
    members = next(line for line in mesh.lines("pp") if mesh.rank in line)
    owners = _owners(pipe, mesh.pp, lm.lm_head is None)
    for name, p in lm.named_parameters():
        dist.broadcast(p.data, src=members[owners[_layer_of(name, len(lm.layers))][0]], group=group)


@contextlib.contextmanager
def full_model(lm, pipe, mesh, device):
    """The whole `lm`, up to date, on `device` and in the stage's dtype, for evaluation and sampling.

    During training a stage keeps only its own layers on the device (DeepSpeed places them);
    the other layers (on the meta device when the rank built only its own, else waiting on the
    CPU) come to the device only inside this block."""
    if pipe is None:
        yield lm
        return
    dtype = next(pipe.parameters()).dtype  # bf16 when DeepSpeed trains in bf16
    swapped = materialize(lm, device)  # the other stages' pieces, built on the meta device only
    lm.to(device=device, dtype=dtype)
    sync_full_model(lm, pipe, mesh)
    try:
        yield lm
    finally:
        dematerialize(swapped)
        stage, owners, n = mesh.rank_in("pp"), _owners(pipe, mesh.pp, lm.lm_head is None), len(lm.layers)
        for name, p in lm.named_parameters():
            if stage not in owners[_layer_of(name, n)] and not p.is_meta:
                p.data = p.data.to("cpu")
