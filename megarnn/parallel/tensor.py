"""Tensor-parallel building blocks (Megatron-LM, Shoeybi et al. 2019, sec. 3; sequence
parallelism, Korthikanti et al. 2022).

Communication, each an autograd function over the tensor-parallel group:
    copy_to_tp       forward identity,      backward all-reduce      ("f": a sublayer's input)
    reduce_from_tp   forward all-reduce,    backward identity        ("g": a row-parallel output)
    gather_seq       forward all-gather T,  backward reduce-scatter  (sequence parallel "f")
    scatter_seq      forward reduce-scatter T, backward all-gather   (sequence parallel "g")
    all_reduce_sum   forward all-reduce,    backward all-reduce      (a sum each rank uses for its shard)
    gather_from_tp   forward all-gather along a dim, backward keep the local slice

One "f" per sublayer: the pass (megarnn/parallel/plan.py) puts a SublayerInput hook in front of
each mixer and each MLP, which copies (TP) or gathers along T (SP) the sublayer's input ONCE;
the column-parallel and replicated layers inside then read it without communicating, and the
hook's backward sums all their input gradients in one all-reduce (TP) or reduce-scatter (SP).
Each residual branch ends in one "g": the row-parallel output's all-reduce (TP) or
reduce-scatter along T (SP). So per branch TP moves one all-reduce forward and one backward,
and SP one all-gather + one reduce-scatter each way: the same bytes (a ring all-reduce is a
reduce-scatter plus an all-gather), with norms, residual adds and activations between the
branches on T / tp steps.

Under sequence parallelism every parameter that all ranks apply to their own tokens (norm
weights, row-parallel biases) gets the sum of the ranks' gradients; replicated projections
(MQA's single key/value head) sum their weight gradients over the group in every mode.

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


def _all_gather_cat(x, group, dim: int):
    parts = [torch.empty_like(x) for _ in range(_world(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter_seq(x, group):
    """(B, T, ...) partial sums on every rank -> (B, T / tp, ...) of the sum, this rank's rows."""
    xt = x.transpose(0, 1).contiguous()  # reduce_scatter_tensor cuts dim 0
    out = xt.new_empty(xt.shape[0] // _world(group), *xt.shape[1:])
    dist.reduce_scatter_tensor(out, xt, group=group)
    return out.transpose(0, 1).contiguous()  # batch-first again (a pipeline stage sends it as it is)


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_cat(x, group, 1)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_seq(g, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

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


def _component(spec, world: int, rank: int) -> tuple[int, int, int]:
    """A component of a tp_split record -> (full size, start of this rank's slice, slice size).

    spec: n (cut evenly: rank r takes [r n / world, (r + 1) n / world)), or [n, blocks]: n is
    `blocks` equal blocks (Mamba2's B / C per group), cut evenly when world <= blocks, else each
    block kept whole by world / blocks ranks (rank r: block r // (world / blocks)), as mamba_ssm
    replicates B and C when there are fewer groups than ranks."""
    n, blocks = (spec, 0) if isinstance(spec, int) else spec
    if blocks and blocks < world:
        if world % blocks or n % blocks:
            raise ValueError(f"cannot share {blocks} blocks of a component of size {n} among {world} "
                             "tensor-parallel ranks (world must be a multiple of the blocks)")
        k = n // blocks
        return n, (rank // (world // blocks)) * k, k
    if n % world:
        raise ValueError(f"cannot split a component of size {n} across {world} tensor-parallel ranks")
    k = n // world
    return n, rank * k, k


def shard(t: torch.Tensor, dim: int, sizes: list, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of each component of `t` along `dim`, concatenated.

    sizes: the full sizes of the packed components along dim (e.g. [z, x, B, C, dt] of
    Mamba2's in_proj), each an int or [size, blocks] (see _component).
    """
    parts, start = [], 0
    for spec in sizes:
        n, offset, k = _component(spec, world, rank)
        parts.append(t.narrow(dim, start + offset, k))
        start += n
    return torch.cat(parts, dim=dim).clone()


def merge_shards(parts: list[torch.Tensor], dim: int, sizes: list) -> torch.Tensor:
    """Inverse of `shard`: parts[r] is rank r's shard -> the full tensor (a block kept by several
    ranks is taken from the first of them)."""
    world, out, start = len(parts), [], 0
    for spec in sizes:
        n, _, k = _component(spec, world, 0)
        owners = range(world) if k * world == n else range(0, world, world * k // n)
        out += [parts[r].narrow(dim, start, k) for r in owners]
        start += k
    return torch.cat(out, dim)


def _replicated_rows(dim: int, sizes: list, world: int) -> list[tuple[int, int, int, int]]:
    """(start, size, blocks, this rank's block) of the local components kept whole by several ranks."""
    out, start = [], 0
    for spec in sizes:
        n, _, k = _component(spec, world, 0)
        if k * world != n:
            out.append((start, k, n // k))
        start += k
    return out


class _SumReplicatedBlocks:
    """A gradient hook for a parameter with components kept whole by several ranks (Mamba2's B /
    C rows when there are fewer groups than ranks): each rank's gradient of such a block covers
    only its heads, so the block's gradient is summed over the ranks that keep it (one all-reduce
    over the group of a (blocks, ...) buffer in which each rank fills its own block's slot)."""

    def __init__(self, dim, rows, group):
        self.dim, self.rows, self.group = dim, rows, group
        self.world, self.rank = _world(group), _rank(group)

    def __call__(self, grad):
        grad = grad.clone()
        for start, k, blocks in self.rows:
            g = grad.narrow(self.dim, start, k)
            buf = g.new_zeros(blocks, *g.shape)
            buf[self.rank // (self.world // blocks)] = g
            dist.all_reduce(buf, group=self.group)
            g.copy_(buf[self.rank // (self.world // blocks)])
        return grad


def sharded_parameter(full: torch.Tensor, dim: int, sizes: list | None, group) -> nn.Parameter:
    sizes = sizes or [full.shape[dim]]
    p = nn.Parameter(shard(full.detach(), dim, sizes, _rank(group), _world(group)))
    p.tp_split = (dim, [s if isinstance(s, int) else list(s) for s in sizes])
    p.tensor_model_parallel = True  # DeepSpeed counts it on every rank in the gradient norm
    rows = _replicated_rows(dim, sizes, _world(group))
    if rows:
        p.register_hook(_SumReplicatedBlocks(dim, rows, group))
        # The gradient norm sums squares over the group: a block kept by m ranks counts 1 / m each.
        weight = torch.ones(p.shape[dim])
        for start, k, blocks in rows:
            weight[start:start + k] = blocks / _world(group)
        p.tp_grad_weight = (dim, weight)
    return p


class SublayerInput:
    """A forward pre-hook on a sublayer (mixer or MLP): its input, the same on every rank, made
    ready once for the column-parallel layers inside: copy_to_tp, or under sequence parallelism
    gather_seq ((B, T / tp, D) -> (B, T, D)). Off (evaluation of whole sequences without SP):
    copy_to_tp."""

    def __init__(self, group):
        self.group, self.sequence_parallel = group, False

    def __call__(self, module, args):
        x, *rest = args
        x = gather_seq(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        return (x, *rest)


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local: this rank's output features. (..., D) -> (..., out / tp).

    x is the sublayer's input as SublayerInput made it ready (copied or gathered once for all
    the column-parallel layers of the sublayer), so this layer itself does not communicate."""

    def __init__(self, full: nn.Linear, group, components: list[int] | None = None):
        super().__init__()
        self.group = group
        self.weight = sharded_parameter(full.weight, 0, components, group)
        self.bias = sharded_parameter(full.bias, 0, components, group) if full.bias is not None else None

    def forward(self, x):
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
    key/value head). Each rank's output gradient is partial (its heads): the weight's gradient
    is summed over the group here; the input's partial gradient is summed by the sublayer's
    SublayerInput, with the column-parallel layers' (x as ColumnParallelLinear gets it)."""

    def __init__(self, full: nn.Linear, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(full.weight.detach().clone())
        self.bias = nn.Parameter(full.bias.detach().clone()) if full.bias is not None else None

    def forward(self, x):
        bias = copy_to_tp(self.bias, self.group) if self.bias is not None else None
        return F.linear(x, copy_to_tp(self.weight, self.group), bias)


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
