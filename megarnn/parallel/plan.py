"""The parallelism pass: applied to a built, plain RecurrentLM (as torchtitan's parallelize_*).

    apply_tensor_parallel(model, group)     # in place; the model then computes this rank's share
    apply_sequence_parallel(model, group)   # Megatron SP inside the tp group
    apply_context_parallel(model, group)    # the ops work on this rank's chunk of the sequence

How each block kind splits under tensor parallelism is its entry in megarnn/registry.py
(column / row / replicated linears, per-channel and per-head slices, packed components cut
separately); this pass reads it and swaps layers or slices parameters, then lets the entry fix
its head / channel counts (`localize`). Every family splits by heads or channels, so the
recurrences stay local (no communication inside a scan or a Newton solve), and each residual
branch ends in one all-reduce (reduce-scatter under sequence parallelism). The gated MLP:
gate, up column-parallel, down row-parallel; embedding and (tied) head split by vocabulary,
with vocabulary-parallel cross-entropy. Context parallelism is not in the model at all: the
ops split their own work (megarnn/ops/context.py); this pass only enters their context around
the model's and each block's forward.
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megarnn import registry
from megarnn.config import ModelConfig
from megarnn.models.blocks import InputSkip, RMSNorm
from megarnn.models.mamba2 import GatedGroupRMSNorm
from megarnn.models.pararnn import GatedRMSNorm
from megarnn.ops.context import context_parallel
from megarnn.parallel.tensor import (ColumnParallelLinear, HeadInput, ReplicatedLinear, RowParallelLinear,
                                     SublayerInput, SumGradOverGroup, VocabParallelCrossEntropy,
                                     VocabParallelEmbedding, all_reduce_sum, sharded_parameter)


@dataclass
class Layout:
    """How a model was split by the passes below (kept on the model as `model.layout`); the
    model itself never reads it. whole_sequences switches the sequence splits off for a while."""

    tp_group: object = None
    head_input: HeadInput | None = None
    sublayer_inputs: list = field(default_factory=list)
    split_sequence: "SplitSequence | None" = None
    sequence_parallel: bool = False
    norm_grad_hooks: list = field(default_factory=list)


def layout(model: nn.Module) -> Layout:
    if getattr(model, "layout", None) is None:
        model.layout = Layout()
    return model.layout


def check_tensor_parallel(c: ModelConfig, tp: int) -> None:
    """Reject sizes that do not split evenly, with the numbers, before any group is built."""
    c.check_tensor_parallel(tp)


def apply_tensor_parallel(model: nn.Module, group, make=None, placed=None) -> nn.Module:
    """Replace every piece of `model` (a full RecurrentLM) by this rank's shard, in place.

    make: name -> a full piece to shard in place of the model's own (local construction builds
    this rank's pieces for real one at a time and leaves the others on the meta device).
    placed: called with (name, shard) once each shard is in place (ZeRO-3 partitions it then)."""
    c = model.c
    check_tensor_parallel(c, dist.get_world_size(group))
    for name in model.piece_names():
        shard = shard_piece(c, name, make(name) if make else model.get_submodule(name), group)
        set_piece(model, name, shard)
        if placed is not None:
            placed(name, shard)
    lay = layout(model)
    for layer in model.layers:  # one copy (gather under SP) of each sublayer's input
        has_mlp = registry.block_kind(layer.kind, c).has_mlp
        for sub in [layer.mixer] + ([layer.mlp_block] if has_mlp else []):
            hook = SublayerInput(group)
            sub.register_forward_pre_hook(hook)
            lay.sublayer_inputs.append(hook)
    # The head computes this rank's vocabulary slice: its input's gradient is summed over the
    # group (gathered along T under sequence parallelism), and the loss is vocabulary-parallel.
    lay.tp_group, lay.head_input = group, HeadInput(group)
    model.final_norm.register_forward_hook(lay.head_input)
    model.loss = VocabParallelCrossEntropy(group)
    model.tp_group = group  # sampling gathers the logits over it (megarnn/generate.py)
    return model


def shard_piece(c: ModelConfig, name: str, piece: nn.Module, group) -> nn.Module:
    """This rank's shard of one piece of a RecurrentLM (embed_tokens, layers.i, final_norm,
    lm_head), as the block registry says; layers are changed in place."""
    if name == "embed_tokens":
        return VocabParallelEmbedding(piece, group)
    if name == "lm_head":
        return ColumnParallelLinear(piece, group)
    if name == "final_norm":
        return piece
    kind = registry.block_kind(piece.kind, c)
    shard_module(piece.mixer, kind.splits(c), group)
    if kind.localize is not None:
        kind.localize(piece.mixer, dist.get_world_size(group))
    if kind.has_mlp:
        shard_module(piece.mlp_block, registry.MLP_PLAN, group)
    return piece


def set_piece(model: nn.Module, name: str, piece: nn.Module) -> None:
    if name.startswith("layers."):
        model.layers[int(name.split(".")[1])] = piece
    else:
        setattr(model, name, piece)


class SplitSequence:
    """Forward hooks that run a module inside `context_parallel(group)`: the model and each of
    its blocks (a block recomputed by activation checkpointing enters it again)."""

    def __init__(self, group):
        self.group, self.on, self._exits = group, True, []

    def enter(self, module=None, args=None):
        cm = context_parallel(self.group if self.on else None)
        cm.__enter__()
        self._exits.append(cm)

    def exit(self, module=None, args=None, output=None):
        self._exits.pop().__exit__(None, None, None)

    def attach(self, module: nn.Module) -> None:
        module.register_forward_pre_hook(self.enter)
        module.register_forward_hook(self.exit, always_call=True)

    @contextlib.contextmanager
    def active(self):
        """The split around code that calls a model's pieces directly (pipeline stages)."""
        self.enter()
        try:
            yield
        finally:
            self.exit()


def apply_context_parallel(model: nn.Module, group) -> nn.Module:
    """Every rank of `group` then runs its own chunk of the sequence (rank r: steps
    [r T/cp, (r+1) T/cp)): the ops pass O(B x D) carries and convs / attention a halo
    (megarnn/ops/context.py). Parameter gradients are each rank's share: all-reduce them (sum)
    over the group. A group of None or one rank leaves the model as it is."""
    if group is None or dist.get_world_size(group) == 1:
        return model
    split = layout(model).split_sequence = SplitSequence(group)
    for module in [model, *model.layers]:
        split.attach(module)
    return model


def sequence_count(mask: torch.Tensor, cp_group) -> torch.Tensor:
    """Masked tokens of the whole sequences when each rank of cp_group holds a chunk of them
    (the denominator of RecurrentLM.masked_loss under context parallelism)."""
    count = mask.sum().to(torch.float32)
    if cp_group is not None:
        dist.all_reduce(count, group=cp_group)
    return count


def apply_sequence_parallel(model: nn.Module, group, on: bool = True) -> nn.Module:
    """Megatron sequence parallelism on a tensor-parallel model: between layers each rank of
    `group` holds T / tp steps of the residual stream (norms and residual adds on a shard).
    A norm's weight (or a block's InputSkip) then sees only this rank's tokens: its gradient is
    summed over the group."""
    lay = layout(model)
    _set_sequence_parallel(model, on)
    if not lay.norm_grad_hooks:
        for m in model.modules():
            if isinstance(m, (RMSNorm, InputSkip)):
                hook = SumGradOverGroup(group)
                m.weight.register_hook(hook)
                lay.norm_grad_hooks.append(hook)
    for hook in lay.norm_grad_hooks:
        hook.on = on
    lay.sequence_parallel = on
    return model


def _set_sequence_parallel(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if hasattr(m, "sequence_parallel"):
            m.sequence_parallel = on
    lay = layout(model)
    for hook in lay.sublayer_inputs + ([lay.head_input] if lay.head_input is not None else []):
        hook.sequence_parallel = on


@contextlib.contextmanager
def whole_sequences(model: nn.Module):
    """Run whole sequences on every rank for a while (evaluation, sampling): context and
    sequence parallelism off (their ranks hold full weights); tensor parallelism stays."""
    lay = layout(model)
    split_on = lay.split_sequence is not None and lay.split_sequence.on
    if lay.split_sequence is not None:
        lay.split_sequence.on = False
    _set_sequence_parallel(model, False)
    try:
        yield model
    finally:
        if lay.split_sequence is not None:
            lay.split_sequence.on = split_on
        _set_sequence_parallel(model, lay.sequence_parallel)


class SplitGatedRMSNorm(GatedRMSNorm):
    """GatedRMSNorm over channels split across a tensor-parallel group: the mean square sums
    the ranks' shares (`full_dim` is the unsplit width)."""

    def __init__(self, full: GatedRMSNorm, group):
        super().__init__(full.weight.shape[0], full.eps)
        self.group, self.full_dim = group, full.weight.shape[0]
        self.weight = sharded_parameter(full.weight, 0, None, group)

    def mean_square(self, y: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(y.pow(2).sum(-1, keepdim=True), self.group) / self.full_dim


class SplitGroupRMSNorm(GatedGroupRMSNorm):
    """GatedGroupRMSNorm (Mamba2) over channels split across a tensor-parallel group: a rank keeps
    n_groups / tp whole groups, or, with fewer groups than ranks, a 1 / (tp / n_groups) share of
    one group, whose mean square then sums the shares of the ranks that keep it."""

    def __init__(self, full: GatedGroupRMSNorm, group):
        world, rank, G = dist.get_world_size(group), dist.get_rank(group), full.groups
        super().__init__(full.weight.shape[0] // world, max(G // world, 1), full.eps)
        self.weight = sharded_parameter(full.weight, 0, None, group)
        self.group, self.blocks, self.shared = group, G, G < world
        self.group_size = full.weight.shape[0] // G
        self.slot = rank // (world // G) if self.shared else 0

    def mean_square(self, h: torch.Tensor) -> torch.Tensor:
        if not self.shared:
            return super().mean_square(h)
        onehot = torch.nn.functional.one_hot(torch.tensor(self.slot), self.blocks).to(h.dtype)
        sums = all_reduce_sum(h.pow(2).sum(-1, keepdim=True) * onehot, self.group)  # (..., 1, blocks)
        return sums[..., self.slot:self.slot + 1] / self.group_size


def _matches(module: nn.Module, pattern: str) -> list[tuple[nn.Module, str]]:
    """(parent, attribute name) for every parameter or submodule whose dotted path matches
    `pattern` ("a.b"; "a.*.w" or "a.*_gate.w": a glob matches one name)."""
    *parents, leaf = pattern.split(".")
    nodes = [module]
    for part in parents:
        nodes = [child for node in nodes for name, child in node.named_children() if fnmatch.fnmatchcase(name, part)]
    out = []
    for node in nodes:
        names = [n for n, _ in node.named_children()] + [n for n, _ in node.named_parameters(recurse=False)]
        out += [(node, n) for n in names if fnmatch.fnmatchcase(n, leaf)]
    return out


def shard_module(mixer: nn.Module, splits: dict, group) -> None:
    """Apply a registry tp plan ({path: Split}) to one mixer (or MLP), in place."""
    for path, rule in splits.items():
        targets = _matches(mixer, path)
        if not targets:
            raise ValueError(f"tensor parallel plan of {type(mixer).__name__}: nothing named {path!r}")
        sizes = rule.components(mixer) if rule.components is not None else None
        for parent, name in targets:
            setattr(parent, name, _shard(getattr(parent, name), rule.how, sizes, group))


def _shard(target, how: str, sizes, group):
    if how == "column":
        return ColumnParallelLinear(target, group, sizes)
    if how == "row":
        return RowParallelLinear(target, group)
    if how == "replicated":
        return ReplicatedLinear(target, group)
    if how == "norm":
        return (SplitGroupRMSNorm if isinstance(target, GatedGroupRMSNorm) else SplitGatedRMSNorm)(target, group)
    return sharded_parameter(target, {"dim0": 0, "dim1": 1}[how], sizes, group)
