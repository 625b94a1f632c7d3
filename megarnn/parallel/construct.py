"""Local construction: a rank builds only its share of the model.

    model, owned = build_local(config, mesh, seed, parallel)

The whole model is first built on the meta device (shapes only, no memory). Then each piece
this rank trains (its pipeline stage's embedding / blocks / norm / head) is built for real on
the CPU from its own seed (RecurrentLM.make_piece: the values one process would have), cut to
this rank's tensor-parallel shard and put in place, one piece at a time: a rank's peak during
setup is its own shard plus one full piece. The other stages' pieces stay on the meta device
(pipeline.full_model gives them memory for a moment when the whole model must run).

The pipeline partition is decided here, once, on a throwaway meta copy with the same tensor
parallelism, by the method DeepSpeed's PipelineModule would use (`stage_parts`), and handed to
it as explicit bounds, so the two cannot disagree.
"""
from __future__ import annotations

import torch
from torch import nn

from megarnn.config import ModelConfig, stage_bounds
from megarnn.models import RecurrentLM
from megarnn.parallel.plan import (apply_context_parallel, apply_sequence_parallel, apply_tensor_parallel,
                                   set_piece)


def pipeline_layers(lm: RecurrentLM) -> list[list[str]]:
    """The pipeline's layers (megarnn/parallel/pipeline.py), each as the pieces it runs:
    embedding, one per block, final norm, head (the tied head runs the embedding again)."""
    n = len(lm.layers)
    head = ["embed_tokens"] if lm.lm_head is None else ["lm_head"]
    return [["embed_tokens"], *([f"layers.{i}"] for i in range(n)), ["final_norm"], head]


def stage_parts(lm: RecurrentLM, pp: int, balance: str) -> list[int]:
    """Stage boundaries over the pipeline layers, as DeepSpeed's PipelineModule computes them for
    partition_method "uniform" / "parameters" (trainable parameters of each layer, this rank's
    tensor-parallel shard), or from an explicit "3,5" balance."""
    from deepspeed.runtime import utils as ds_utils

    layers = pipeline_layers(lm)
    bounds = stage_bounds(balance, len(lm.layers), pp)
    if bounds is not None:
        return bounds
    if balance == "uniform":
        return ds_utils.partition_uniform(num_items=len(layers), num_parts=pp)
    counts = [sum(p.numel() for name in pieces for p in lm.get_submodule(name).parameters() if p.requires_grad)
              for pieces in layers]
    return ds_utils.partition_balanced(weights=counts, num_parts=pp)


def owned_pieces(lm: RecurrentLM, parts: list[int], stage: int) -> set[str]:
    """The pieces a pipeline stage trains (a tied embedding: the first and the last stage)."""
    layers = pipeline_layers(lm)
    return {name for pieces in layers[parts[stage]:parts[stage + 1]] for name in pieces}


def _meta_model(c: ModelConfig, seed: int) -> RecurrentLM:
    with torch.device("meta"):
        return RecurrentLM(c, seed=seed)


def build_local(c: ModelConfig, mesh, seed: int, parallel, real: bool = True, partition=None
                ) -> tuple[RecurrentLM, set[str], list[int] | None]:
    """This rank's model with the layout's passes applied -> (model, the pieces it holds for real,
    the pipeline's stage bounds or None). parallel: the ParallelConfig (sequence_parallel,
    pp_balance); mesh: the ParallelMesh (its tp / cp / pp groups). real=False leaves every piece
    on the meta device (shapes only: megarnn plan). partition: called with each real piece once
    it is this rank's tensor-parallel shard and in place (ZeRO-3 partitions it over the data
    parallel ranks then, so the setup peak is one piece, not the rank's whole shard)."""
    tp_group = mesh.group("tp") if mesh.tp > 1 else None
    parts = None
    model = _meta_model(c, seed)
    names = model.piece_names()
    owned = set(names)
    if mesh.pp > 1:
        sizing = _meta_model(c, seed)
        if tp_group is not None:
            apply_tensor_parallel(sizing, tp_group)
        parts = stage_parts(sizing, mesh.pp, parallel.pp_balance)
        owned = owned_pieces(sizing, parts, mesh.rank_in("pp"))

    def make(name: str) -> nn.Module:
        return model.make_piece(name) if real and name in owned else model.get_submodule(name)

    def placed(name: str, piece: nn.Module) -> None:
        if partition is not None and real and name in owned:
            partition(piece)

    if tp_group is not None:
        apply_tensor_parallel(model, tp_group, make=make, placed=placed)
    elif real:
        for name in sorted(owned, key=names.index):
            set_piece(model, name, make(name))
            placed(name, model.get_submodule(name))
    if mesh.cp > 1:
        apply_context_parallel(model, mesh.group("cp"))
    if parallel.sequence_parallel:
        apply_sequence_parallel(model, tp_group)
    return model, owned, parts


@torch.no_grad()
def materialize(module: nn.Module, device) -> list:
    """Give a module's meta parameters memory on `device` (uninitialized), keeping their
    attributes (tp_split, ...): -> the meta parameters replaced, for `dematerialize`."""
    swapped = []
    for sub in module.modules():
        for key, p in list(sub._parameters.items()):
            if p is not None and p.is_meta:
                new = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                sub._parameters[key] = new
                swapped.append((sub, key, p))
    return swapped


def dematerialize(swapped: list) -> None:
    """Put back the meta parameters `materialize` replaced (their memory is freed)."""
    for sub, key, p in swapped:
        sub._parameters[key] = p
