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

import torch.distributed as dist
from torch import nn

from megarnn.config import ModelConfig
from megarnn.models.blocks import GatedMLP, LocalAttentionBlock, RecurrentBlock, RMSNorm
from megarnn.models.mamba2 import Mamba2Mixer
from megarnn.models.pararnn import ParaRNNMixer
from megarnn.parallel.tensor import (ColumnParallelLinear, ReplicatedLinear, RowParallelLinear,
                                     VocabParallelEmbedding, sharded_parameter)


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
    model.tp_group = group
    return model


def apply_context_parallel(model: nn.Module, group) -> nn.Module:
    """Every rank of `group` then runs its own chunk of the sequence (rank r: steps
    [r T/cp, (r+1) T/cp)); scans pass O(B x D) carries and convs / attention a halo.
    Parameter gradients are each rank's share: all-reduce them (sum) over the group."""
    for module in model.modules():
        if hasattr(module, "cp_group"):
            module.cp_group = group
    return model


def apply_sequence_parallel(model: nn.Module, group, on: bool = True) -> nn.Module:
    """Megatron sequence parallelism on a tensor-parallel model: between layers each rank of
    `group` holds T / tp steps of the residual stream (norms and residual adds on a shard)."""
    for m in model.modules():
        if hasattr(m, "sequence_parallel"):
            m.sequence_parallel = on
        if isinstance(m, RMSNorm):
            m.sp_group = group if on else None
    return model


@contextlib.contextmanager
def whole_sequences(model: nn.Module):
    """Run whole sequences on every rank for a while (evaluation, sampling): context and
    sequence parallelism off (their ranks hold full weights); tensor parallelism stays."""
    cp = {m: m.cp_group for m in model.modules() if hasattr(m, "cp_group")}
    sp = {m: (getattr(m, "sequence_parallel", False), getattr(m, "sp_group", None)) for m in model.modules()
          if hasattr(m, "sequence_parallel") or isinstance(m, RMSNorm)}
    apply_context_parallel(model, None)
    apply_sequence_parallel(model, None, on=False)
    try:
        yield model
    finally:
        for m, g in cp.items():
            m.cp_group = g
        for m, (on, g) in sp.items():
            if hasattr(m, "sequence_parallel"):
                m.sequence_parallel = on
            if isinstance(m, RMSNorm):
                m.sp_group = g


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
    _split(m.norm, "weight", group)
    m.norm.tp_group = group
    m.out_proj = RowParallelLinear(m.out_proj, group)
