"""Tensor-parallel building blocks (Megatron-LM, Shoeybi et al. 2019, sec. 3).

Communication, each an autograd function over the tensor-parallel group:
    copy_to_tp       forward identity,   backward all-reduce   (input of a column-parallel layer)
    reduce_from_tp   forward all-reduce, backward identity     (output of a row-parallel layer)
    all_reduce_sum   forward all-reduce, backward all-reduce   (a sum each rank uses for its shard)
    gather_seq       forward all-gather along T, backward reduce-scatter   (sequence parallel:
    scatter_seq      forward reduce-scatter along T, backward all-gather    Megatron-SP, Korthikanti
                                                                            et al. 2022)

Under sequence parallelism (`layer.sequence_parallel = True`) the residual stream between
layers holds T / tp steps per rank: column-parallel layers gather the sequence first,
row-parallel layers and the embedding reduce-scatter it, and every parameter that all ranks
use on their own tokens (norm weights, row-parallel biases, replicated projections) goes
through copy_to_tp, so its gradient is the sum over the ranks' tokens.
    gather_from_tp   forward all-gather along a dim, backward keep the local slice

Layers built from a full (unsharded) module, keeping only this rank's slice:
    ColumnParallelLinear   output features split (possibly per component of a packed output)
    RowParallelLinear      input features split; partial outputs all-reduced, bias added once
    VocabParallelEmbedding vocabulary rows split; lookups outside the slice give 0, all-reduced
and vocab_parallel_cross_entropy over logits whose vocabulary is split across the group.

Every sharded parameter records how it was cut in `param.tp_split = (dim, full sizes of the
components along dim)`, so shards can be put back together (tests, checkpoint conversion).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world(group) -> int:
    return dist.get_world_size(group)


def _rank(group) -> int:
    return dist.get_rank(group)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim, ctx.size = group, dim, x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(_world(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, g):
        return g.narrow(ctx.dim, _rank(ctx.group) * ctx.size, ctx.size).contiguous(), None, None


class _AllReduceSum(torch.autograd.Function):
    """Forward and backward all-reduce: a sum over the group whose result each rank uses for
    its own shard (e.g. the sum of squares of an RMSNorm over channels split across ranks)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_reduce_sum(x, group):
    return _AllReduceSum.apply(x, group) if group is not None else x


def _local_rows(x, group, dim: int):
    n = x.shape[dim] // _world(group)
    return x.narrow(dim, _rank(group) * n, n).contiguous()


def _all_gather_cat(x, group, dim: int):
    parts = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_cat(x, group, 1)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)  # gloo has no reduce-scatter: all-reduce, keep our rows
        return _local_rows(g, ctx.group, 1), None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return _local_rows(x, group, 1)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_cat(g, ctx.group, 1), None


def gather_seq(x, group):
    """(B, T / tp, ...) -> (B, T, ...); backward reduce-scatters."""
    return _GatherSeq.apply(x, group)


def scatter_seq(x, group):
    """(B, T, ...) partial sums -> (B, T / tp, ...) of the total; backward all-gathers."""
    return _ScatterSeq.apply(x, group)


def copy_to_tp(x, group):
    return _CopyToTP.apply(x, group) if group is not None else x


def reduce_from_tp(x, group):
    return _ReduceFromTP.apply(x, group) if group is not None else x


def gather_from_tp(x, group, dim: int = -1):
    return _GatherFromTP.apply(x, group, dim % x.dim()) if group is not None else x


def shard(t: torch.Tensor, dim: int, sizes: list[int], rank: int, world: int) -> torch.Tensor:
    """This rank's slice of each component of `t` along `dim`, concatenated.

    sizes: the full sizes of the packed components along dim (e.g. [z, x, B, C, dt] of
    Mamba2's in_proj); each must be divisible by world.
    """
    parts, start = [], 0
    for n in sizes:
        if n % world:
            raise ValueError(f"cannot split a component of size {n} across {world} tensor-parallel ranks")
        k = n // world
        parts.append(t.narrow(dim, start + rank * k, k))
        start += n
    return torch.cat(parts, dim=dim).clone()


def merge_shards(parts: list[torch.Tensor], dim: int, sizes: list[int]) -> torch.Tensor:
    """Inverse of `shard`: parts[r] is rank r's shard -> the full tensor."""
    out, start = [], 0
    for n in sizes:
        k = n // len(parts)
        out += [p.narrow(dim, start, k) for p in parts]
        start += k
    return torch.cat(out, dim)


def sharded_parameter(full: torch.Tensor, dim: int, sizes: list[int] | None, group) -> nn.Parameter:
    sizes = sizes or [full.shape[dim]]
    p = nn.Parameter(shard(full.detach(), dim, sizes, _rank(group), _world(group)))
    p.tp_split = (dim, list(sizes))
    p.tensor_model_parallel = True  # DeepSpeed counts it on every rank in the gradient norm
    return p


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local: this rank's output features. (..., D) -> (..., out / tp)."""

    def __init__(self, full: nn.Linear, group, components: list[int] | None = None):
        super().__init__()
        self.group, self.sequence_parallel = group, False
        self.weight = sharded_parameter(full.weight, 0, components, group)
        self.bias = sharded_parameter(full.bias, 0, components, group) if full.bias is not None else None

    def forward(self, x):
        x = gather_seq(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T) + b. (..., in / tp) -> (..., out)."""

    def __init__(self, full: nn.Linear, group):
        super().__init__()
        self.group, self.sequence_parallel = group, False
        self.weight = sharded_parameter(full.weight, 1, None, group)
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x):
        y = F.linear(x, self.weight)
        if not self.sequence_parallel:
            y = reduce_from_tp(y, self.group)
            return y + self.bias if self.bias is not None else y
        y = scatter_seq(y, self.group)
        return y + copy_to_tp(self.bias, self.group) if self.bias is not None else y


class ReplicatedLinear(nn.Module):
    """A full linear on every rank whose output feeds only this rank's heads (MQA's single
    key/value head): the output's gradient is summed over the group, so the weight's and
    the input's gradients are the full ones, identical on every rank."""

    def __init__(self, full: nn.Linear, group):
        super().__init__()
        self.group, self.sequence_parallel = group, False
        self.weight = nn.Parameter(full.weight.detach().clone())
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x):
        if not self.sequence_parallel:
            return copy_to_tp(F.linear(x, self.weight, self.bias), self.group)
        # Each rank's output gradient is partial (its heads): sum the weight's over the group,
        # and let the gather's reduce-scatter sum the input's.
        bias = copy_to_tp(self.bias, self.group) if self.bias is not None else None
        return F.linear(gather_seq(x, self.group), copy_to_tp(self.weight, self.group), bias)


class VocabParallelEmbedding(nn.Module):
    """Rows [rank * V / tp, (rank + 1) * V / tp) of the table on each rank. (B, T) -> (B, T, D)."""

    def __init__(self, full: nn.Embedding, group):
        super().__init__()
        self.group, self.sequence_parallel = group, False
        self.weight = sharded_parameter(full.weight, 0, None, group)
        self.start = _rank(group) * self.weight.shape[0]

    def forward(self, tokens):
        local = tokens - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside[..., None], 0.0)
        return scatter_seq(x, self.group) if self.sequence_parallel else reduce_from_tp(x, self.group)


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over logits split along the vocabulary; nothing of size V is gathered."""

    @staticmethod
    def forward(ctx, logits, targets, group, start):
        logits = logits if logits.dtype == torch.float64 else logits.float()
        m = logits.max(-1, keepdim=True).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        e = torch.exp(logits - m)
        total = e.sum(-1, keepdim=True)
        dist.all_reduce(total, group=group)
        local = targets - start
        inside = (local >= 0) & (local < logits.shape[-1])
        idx = local.clamp(0, logits.shape[-1] - 1)[..., None]
        target_logit = torch.gather(logits - m, -1, idx)[..., 0] * inside
        dist.all_reduce(target_logit, group=group)
        ctx.save_for_backward(e / total, idx, inside)
        return torch.log(total[..., 0]) - target_logit

    @staticmethod
    def backward(ctx, g):
        probs, idx, inside = ctx.saved_tensors
        grad = probs.clone()
        grad.scatter_add_(-1, idx, -inside[..., None].to(grad.dtype))
        return grad * g[..., None], None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group) -> torch.Tensor:
    """logits: (..., V / tp), this rank's vocabulary slice; targets: (...) global ids -> loss (...)."""
    return _VocabParallelCE.apply(logits, targets, group, _rank(group) * logits.shape[-1])


class VocabParallelCrossEntropy(nn.Module):
    """The model's per-token loss when its logits hold this rank's vocabulary slice."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, targets, self.group)


class HeadInput:
    """A forward hook on the final norm: its output enters the vocabulary-parallel head, so it
    is gathered along T under sequence parallelism (each rank normalised T / tp steps) and
    otherwise passed on with its gradient summed over the group (copy_to_tp)."""

    def __init__(self, group):
        self.group, self.sequence_parallel = group, False

    def __call__(self, module, inputs, output):
        return gather_seq(output, self.group) if self.sequence_parallel else copy_to_tp(output, self.group)


class SumGradOverGroup:
    """A gradient hook for a parameter each rank applies to its own tokens (a norm's weight under
    sequence parallelism): its gradient is the sum over the group's ranks. Off: unchanged."""

    def __init__(self, group):
        self.group, self.on = group, True

    def __call__(self, grad):
        if not self.on:
            return grad
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=self.group)
        return grad
