"""How each family is split across a tensor-parallel group: one function per mixer, one place.

    apply_tensor_parallel(model, group)   # in place; the model then computes this rank's share

Every family splits by heads or channels, so the recurrences stay local (no communication
inside a scan or a Newton solve), and each residual branch ends in one all-reduce:
  Griffin / Hawk  recurrent block: linear_x, linear_y column-parallel; conv, RG-LRU gate
                  blocks and Lambda split by channel / head; linear_out row-parallel.
                  attention: query heads split; the single key/value head replicated;
                  o_proj row-parallel.
  Mamba2          in_proj column-parallel per component (z, x, B, C, dt: heads and groups),
                  so a resharded checkpoint stays correct; conv per component; dt_bias,
                  A_log, D and the gated norm by head / group; out_proj row-parallel.
  ParaRNN         in_proj column-parallel per component (u, gate); conv, cell gates
                  (block-diagonal heads), diagonal recurrences and peepholes by channel;
                  the gated RMSNorm sums its mean square over the group; out_proj row-parallel.
  All             gated MLP: gate, up column-parallel, down row-parallel; embedding and
                  (tied) head split by vocabulary, with vocabulary-parallel cross-entropy.
  Sequence        (apply_sequence_parallel) the residual stream between layers split along T
  parallel        within the tp group: gathers before column-parallel layers, reduce-scatters
                  after row-parallel ones (megarnn/parallel/tensor.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megarnn.config import ModelConfig
from megarnn.models.blocks import GatedMLP, LocalAttentionBlock, RecurrentBlock, RMSNorm
from megarnn.models.mamba2 import Mamba2Mixer
from megarnn.models.pararnn import GatedRMSNorm, ParaRNNMixer
from megarnn.ops.context import context_parallel
from megarnn.parallel.tensor import (ColumnParallelLinear, HeadInput, ReplicatedLinear, RowParallelLinear,
                                     SumGradOverGroup, VocabParallelCrossEntropy, VocabParallelEmbedding,
                                     all_reduce_sum, sharded_parameter)


@dataclass
class Layout:
    """How a model was split by the passes below (kept on the model as `model.layout`); the
    model itself never reads it. whole_sequences switches the sequence splits off for a while."""

    tp_group: object = None
    head_input: HeadInput | None = None
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


def apply_tensor_parallel(model: nn.Module, group) -> nn.Module:
    """Replace every layer of `model` (a full RecurrentLM) by this rank's shard, in place."""
    check_tensor_parallel(model.c, dist.get_world_size(group))
    for module in list(model.modules()):
        if isinstance(module, RecurrentBlock):
            _recurrent(module, group)
        elif isinstance(module, LocalAttentionBlock):
            _attention(module, group)
        elif isinstance(module, Mamba2Mixer):
            _mamba2(module, group)
        elif isinstance(module, ParaRNNMixer):
            _pararnn(module, group)
        elif isinstance(module, GatedMLP):
            module.gate_proj = ColumnParallelLinear(module.gate_proj, group)
            module.up_proj = ColumnParallelLinear(module.up_proj, group)
            module.down_proj = RowParallelLinear(module.down_proj, group)
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, group)
    if model.lm_head is not None:
        model.lm_head = ColumnParallelLinear(model.lm_head, group)
    # The head computes this rank's vocabulary slice: its input's gradient is summed over the
    # group (gathered along T under sequence parallelism), and the loss is vocabulary-parallel.
    lay = layout(model)
    lay.tp_group, lay.head_input = group, HeadInput(group)
    model.final_norm.register_forward_hook(lay.head_input)
    model.loss = VocabParallelCrossEntropy(group)
    model.tp_group = group  # sampling gathers the logits over it (megarnn/generate.py)
    return model


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
    A norm's weight then sees only this rank's tokens: its gradient is summed over the group."""
    lay = layout(model)
    _set_sequence_parallel(model, on)
    if not lay.norm_grad_hooks:
        for m in model.modules():
            if isinstance(m, RMSNorm):
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
    if layout(model).head_input is not None:
        layout(model).head_input.sequence_parallel = on


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


def _split(module: nn.Module, name: str, group, dim: int = 0, components: list[int] | None = None) -> None:
    setattr(module, name, sharded_parameter(getattr(module, name), dim, components, group))


def _recurrent(m: RecurrentBlock, group) -> None:
    tp = dist.get_world_size(group)
    m.linear_x = ColumnParallelLinear(m.linear_x, group)
    m.linear_y = ColumnParallelLinear(m.linear_y, group)
    m.linear_out = RowParallelLinear(m.linear_out, group)
    _split(m, "conv_weight", group)
    _split(m, "conv_bias", group)
    lru = m.rg_lru
    for gate in (lru.input_gate, lru.recurrent_gate):  # (heads, width, width): whole heads per rank
        _split(gate, "weight", group)
        _split(gate, "bias", group)
        gate.n_blocks //= tp
    _split(lru, "recurrent_param", group)


def _attention(m: LocalAttentionBlock, group) -> None:
    m.q_proj = ColumnParallelLinear(m.q_proj, group)
    if m.c.n_kv_heads == 1:
        m.k_proj, m.v_proj = ReplicatedLinear(m.k_proj, group), ReplicatedLinear(m.v_proj, group)
    else:
        m.k_proj, m.v_proj = ColumnParallelLinear(m.k_proj, group), ColumnParallelLinear(m.v_proj, group)
    m.o_proj = RowParallelLinear(m.o_proj, group)


def _mamba2(m: Mamba2Mixer, group) -> None:
    tp = dist.get_world_size(group)
    gn = m.n_groups * m.c.d_state
    m.in_proj = ColumnParallelLinear(m.in_proj, group, [m.d_inner, m.d_inner, gn, gn, m.n_heads])
    _split(m, "conv_weight", group, 0, [m.d_inner, gn, gn])
    _split(m, "conv_bias", group, 0, [m.d_inner, gn, gn])
    for name in ("dt_bias", "A_log", "D"):
        _split(m, name, group)
    _split(m.norm, "weight", group)
    m.out_proj = RowParallelLinear(m.out_proj, group)
    m.d_inner, m.n_heads, m.n_groups = m.d_inner // tp, m.n_heads // tp, m.n_groups // tp
    m.conv_dim = m.d_inner + 2 * m.n_groups * m.c.d_state
    m.norm.groups //= tp


def _pararnn(m: ParaRNNMixer, group) -> None:
    tp = dist.get_world_size(group)
    hidden = m.out_proj.in_features
    m.in_proj = ColumnParallelLinear(m.in_proj, group, [hidden, hidden])
    _split(m, "conv_weight", group)
    _split(m, "conv_bias", group)
    cell = m.cell
    for gate in cell.project.gates:
        _split(gate, "weight", group)
        _split(gate, "bias", group)
        gate.n_blocks //= tp
    _split(cell, "recurrent", group, 1)
    if hasattr(cell, "peephole"):
        _split(cell, "peephole", group, 1)
    local = hidden // tp
    if hasattr(cell, "width"):
        cell.width = local
    cell.state_size = cell.state_size // tp
    m.norm = SplitGatedRMSNorm(m.norm, group)
    m.out_proj = RowParallelLinear(m.out_proj, group)
