"""Resume a checkpoint on another layout: tensor-parallel size, data x context parallel ranks
and ZeRO stage (0, 1, 2) may all change.

DeepSpeed reloads only the layout it wrote (ZeRO 1-2 only on as many dp x cp ranks), so a
change goes through the full, unsharded state of the checkpoint, read tensor by tensor:

    full = read_full_state(ckpt_dir, tag)      # every file memory-mapped -> FullState (as if one
                                               # process wrote it; a tensor is read when indexed)
    client = load_full_state(engine, full, mesh)   # this rank's slices -> weights, Adam state,
                                                   # LR schedule, step counters

A rank reads one full source tensor at a time, keeps its slice of it and drops the rest; under
ZeRO 1-2 only the parameters that overlap its partition of the flat vector are read at all. Its
peak is its new shard plus one source tensor. The files are read by
megarnn/train/ds_checkpoint.py (the one reader of DeepSpeed checkpoints).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megarnn.errors import CheckpointError
from megarnn.parallel.tensor import shard
from megarnn.train.ds_checkpoint import FullState, name_map, read_full_state  # noqa: F401 - read_full_state: public here too


def load_full_state(engine, full: FullState, mesh) -> dict:
    """Put this rank's share of `full` into `engine`; returns our client state (the caller restores
    its RNG states).

    Weights: this rank's tensor-parallel slice of each, into the parameters (under ZeRO also
    into the fp32 master slice). Adam: exp_avg, exp_avg_sq and step into the torch optimizer's
    per-parameter state (ZeRO-0) or into the state of ZeRO's flat fp32 slices (ZeRO 1-2). Then
    the LR schedule and DeepSpeed's step counters.
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    tp, tp_rank = mesh.tp, mesh.rank_in("tp")
    to_lm_name = name_map(mesh.pp, full.client["config"]["model"]["n_layers"])
    names = {p: n for n, p in engine.module.named_parameters()}

    def local(tensors: dict[str, torch.Tensor], p: torch.nn.Parameter) -> torch.Tensor:
        """p's slice of a full tensor (float32, on CPU)."""
        name = to_lm_name(names[p])
        if name not in tensors:
            raise CheckpointError(f"the checkpoint has no parameter {name!r}; it was written by another model")
        t = tensors[name]
        if hasattr(p, "tp_split"):
            dim, sizes = p.tp_split
            t = shard(t, dim, sizes, tp_rank, tp)
        if t.shape != p.shape:
            raise CheckpointError(f"the checkpoint's {name!r} gives a {tuple(t.shape)} slice on tensor-parallel "
                                  f"rank {tp_rank} of {tp}, the model needs {tuple(p.shape)}; it was written by "
                                  "another model")
        return t

    with torch.no_grad():
        for p in names:  # under ZeRO 1-2 p.data is a view into the flat bit16 buffer: copy, do not rebind
            p.data.copy_(local(full.model, p))
    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        _load_zero(optimizer, full, local)
    elif isinstance(optimizer, FP16_UnfusedOptimizer):
        _load_bf16_adam(optimizer, full, local)
    elif isinstance(optimizer, torch.optim.Optimizer):
        _load_torch_adam(optimizer, full, local)
    else:
        raise CheckpointError(f"cannot reshard into DeepSpeed's {type(optimizer).__name__}; resume with the layout "
                              "the checkpoint was written with, or with parallel.zero_stage=1 or 2")

    scheduler = engine.lr_scheduler
    if full.lr_scheduler is not None and scheduler is not None:
        scheduler.load_state_dict(full.lr_scheduler)
        # The optimizer steps with each group's "lr", which the scheduler set after the saved step.
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps, engine.global_samples = full.global_steps, full.global_samples
    engine.skipped_steps = full.skipped_steps
    return full.client


def _adam_state(step: int, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, like: torch.Tensor) -> dict:
    """torch AdamW's state of parameter `like`; it keeps "step" as a float32 tensor on the CPU
    (no capturable / fused mode here)."""
    return {"step": torch.tensor(float(step), dtype=torch.float32),
            "exp_avg": exp_avg.to(like.device, torch.float32).clone(),
            "exp_avg_sq": exp_avg_sq.to(like.device, torch.float32).clone()}


def _load_torch_adam(optimizer: torch.optim.Optimizer, full: FullState, local) -> None:
    """ZeRO-0: state[p] of every local parameter."""
    if full.optim_step == 0:
        return  # nothing was updated yet: Adam starts its state at the first step
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = _adam_state(full.optim_step, local(full.exp_avg, p), local(full.exp_avg_sq, p), p)


def _load_bf16_adam(wrapper, full: FullState, local) -> None:
    """ZeRO-0 in bf16: DeepSpeed's FP16_UnfusedOptimizer steps ours on fp32 copies of the bf16
    parameters (fp32_groups, parallel to fp16_groups): the weights and Adam's state go there."""
    for params, masters in zip(wrapper.fp16_groups, wrapper.fp32_groups):
        for p, master in zip(params, masters):
            master.data.copy_(local(full.model, p))
            if full.optim_step > 0:
                wrapper.optimizer.state[master] = _adam_state(full.optim_step, local(full.exp_avg, p),
                                                              local(full.exp_avg_sq, p), master)


def _load_zero(zero, full: FullState, local) -> None:
    """ZeRO 1-2: per param group, this rank's slice of the flat fp32 vector (parameters in
    DeepSpeed's flat order and offsets, padding zero) into the fp32 master slice, and the same
    slices of exp_avg / exp_avg_sq into Adam's state of that slice. Only the parameters that
    overlap the slice are read."""
    for i, params in enumerate(zero.round_robin_bit16_groups):
        offsets = getattr(zero, "round_robin_bit16_offsets", None)  # absent in older DeepSpeed: packed
        offsets = offsets[i] if offsets else [sum(p.numel() for p in params[:j]) for j in range(len(params))]
        rank = dist.get_rank(group=zero.real_dp_process_group[i])
        master = zero.single_partition_of_fp32_groups[i]
        # DeepSpeed's own cut of the flat vector, taken on a tensor without memory: where ours starts, its size.
        mine = zero.get_data_parallel_partitions(torch.empty(zero.bit16_groups_flat[i].numel(), device="meta"), i)[rank]
        start, size = mine.storage_offset(), mine.numel()

        def my_slice(tensors, params=params, offsets=offsets, start=start, size=size) -> torch.Tensor:
            out = torch.zeros(size, dtype=torch.float32)
            for p, offset in zip(params, offsets):
                a, b = max(offset, start), min(offset + p.numel(), start + size)
                if a < b:
                    out[a - start:b - start] = local(tensors, p).flatten()[a - offset:b - offset]
            return out

        master.data.copy_(my_slice(full.model))
        if full.optim_step > 0:
            zero.optimizer.state[master] = _adam_state(full.optim_step, my_slice(full.exp_avg),
                                                       my_slice(full.exp_avg_sq), master)

