"""Process setup and the DeepSpeed engine, built from our config.

One process or many, CPU or GPU, the model always trains inside a DeepSpeed engine:
ZeRO stage from `parallel.zero_stage`, bf16 on GPU and fp32 on CPU (`train.precision`),
gradient clipping, AdamW with decoupled weight decay on matrices only, and a warmup +
cosine learning-rate schedule that DeepSpeed steps (and checkpoints) with the optimizer.
"""
from __future__ import annotations

import math
import os

import torch

from megarnn.config import Config
from megarnn.parallel.launch_env import rendezvous_env
from megarnn.parallel.mesh import DeepSpeedMPU, ParallelMesh, check_sizes
from megarnn.train.watchdog import collective_timeout


def setup_distributed(cfg: Config | None = None) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; returns (rank, world_size).

    Ranks come from torchrun, srun or mpirun (megarnn/parallel/launch_env.py); a plain
    `python -m megarnn train` gets a one-process group on 127.0.0.1.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    # The shared-memory comm op only serves inference all-reduce; building it costs ~100 s of g++.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    rendezvous_env()
    if cfg is not None:  # reject a layout that does not fit before any process group exists
        p = cfg.parallel
        check_sizes(int(os.environ["WORLD_SIZE"]), p.tp, p.pp, p.cp)
    # Also when torch.distributed is up already (tests): DeepSpeed's comm layer then wraps that group.
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # Collectives time out after the hang watchdog's longest allowance (megarnn/train/watchdog.py),
    # so the watchdog reports a hang first; the module defaults also reach the mesh's subgroups.
    timeout = collective_timeout(cfg.train.hang_timeout) if cfg is not None else None
    if timeout is not None and not dist.is_initialized():
        from torch.distributed import distributed_c10d
        distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               **({"timeout": timeout} if timeout is not None else {}))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def use_bf16(cfg: Config) -> bool:
    p = cfg.train.precision
    return p == "bf16" or (p == "auto" and torch.cuda.is_available())


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    """dp_size: the ranks DeepSpeed averages gradients over (data x context parallel)."""
    t = cfg.train
    zero = cfg.parallel.zero_stage
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp_size,
        # Stage 0 clips inside SkipNonFiniteAdamW, which also reports the norm.
        "gradient_clipping": t.grad_clip if zero > 0 else 0.0,
        "zero_optimization": {"stage": zero},
        # Between pipeline stages DeepSpeed sends 1/tp of an activation per tensor-parallel rank and
        # gathers it, which assumes every tp rank holds the same activation; under sequence
        # parallelism each holds its own T / tp slice already, which must travel whole.
        "pipeline": {"pipe_partitioned": not cfg.parallel.sequence_parallel,
                     "grad_partitioned": not cfg.parallel.sequence_parallel},
        "bf16": {"enabled": use_bf16(cfg), "check_grad_overflow": True},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _grad_sq(p) -> torch.Tensor:
    """Sum of squares of p's gradient; rows several tensor-parallel ranks keep whole are
    weighted so that the sum over the group counts them once (megarnn.parallel.tensor)."""
    g = p.grad.float().pow(2)
    if not hasattr(p, "tp_grad_weight"):
        return g.sum()
    dim, weight = p.tp_grad_weight
    return (g.movedim(dim, -1) * weight.to(g.device)).sum()


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that clips by global norm and skips the update when that norm is NaN or Inf.

    Used without ZeRO, where DeepSpeed hands the step to the client optimizer as is;
    DeepSpeed reads `overflow` (counts a skipped step, holds the LR schedule) and
    `_global_grad_norm` (get_global_grad_norm). ZeRO stages do the same check themselves.
    """

    def __init__(self, params, max_grad_norm: float = 0.0, tp_group=None, pp_group=None, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm, self.tp_group, self.pp_group = max_grad_norm, tp_group, pp_group
        self.overflow = False
        self._global_grad_norm = 0.0

    def _global_norm(self, params) -> torch.Tensor:
        """L2 norm of all gradients; under tensor parallelism shards are summed over the group
        and replicated parameters (identical on every rank) counted once; under pipeline
        parallelism the stages' sums are added, a tied copy (`ds_pipe_replicated`) counted once."""
        sq = lambda ps: sum((_grad_sq(p) for p in ps), torch.zeros(()))  # noqa: E731
        params = [p for p in params if not getattr(p, "ds_pipe_replicated", False)]
        if self.tp_group is None:
            total = sq(params)
        else:
            total = sq([p for p in params if getattr(p, "tensor_model_parallel", False)])
            torch.distributed.all_reduce(total, group=self.tp_group)
            total = total + sq([p for p in params if not getattr(p, "tensor_model_parallel", False)])
        if self.pp_group is not None:
            torch.distributed.all_reduce(total, group=self.pp_group)
        return total.sqrt()

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = self._global_norm(params)
        self._global_grad_norm = norm.item()
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        return super().step(closure)


def lr_lambda(cfg: Config):
    """Linear warmup to train.lr, then cosine decay to train.lr * min_lr_ratio at max_steps."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _dim(p) -> int:
    """A parameter's number of dimensions, also when ZeRO-3 has partitioned it (its data is then
    an empty placeholder and ds_shape the real shape)."""
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()


def zero3_partitioner(cfg: Config, mesh: ParallelMesh):
    """ZeRO-3 at construction: a function that partitions one freshly built piece of the model
    over the data x context parallel ranks (deepspeed.zero.Init on an existing module), so no
    rank ever holds more than one whole piece. DeepSpeed's engine then finds the parameters
    partitioned already. (mem_efficient_linear off: it would patch torch's linear globally.)"""
    import deepspeed

    config = deepspeed_config(cfg, mesh.dp * mesh.cp)

    def partition(piece: torch.nn.Module) -> None:
        deepspeed.zero.Init(module=piece, data_parallel_group=mesh.group("dp_cp"), config_dict_or_path=config,
                            mpu=DeepSpeedMPU(mesh), mem_efficient_linear=False)
    return partition


def build_engine(cfg: Config, model: torch.nn.Module, mesh: ParallelMesh):
    """model: a RecurrentLM, or its PipelineModule when mesh.pp > 1 (then a PipelineEngine)."""
    import deepspeed

    t = cfg.train
    decay = [p for n, p in model.named_parameters() if _dim(p) >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if _dim(p) < 2 or "embed" in n]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    if cfg.parallel.zero_stage == 0:
        tp_group = mesh.group("tp") if mesh.tp > 1 else None
        pp_group = mesh.group("pp") if mesh.pp > 1 else None
        optimizer = SkipNonFiniteAdamW(groups, max_grad_norm=t.grad_clip, tp_group=tp_group, pp_group=pp_group,
                                       **kwargs)
    else:
        optimizer = torch.optim.AdamW(groups, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    # Each (non-empty, as DeepSpeed keeps them) group's parameter names in order: a torch optimizer's
    # state_dict knows parameters by index only; checkpoints save these names with it (reshard.py).
    names = {p: n for n, p in model.named_parameters()}
    param_groups = [[names[p] for p in g["params"]] for g in groups if g["params"]]
    # A PipelineModule brings its own grid (the same groups, megarnn/parallel/pipeline.py) as the mpu.
    mpu = None if mesh.pp > 1 else DeepSpeedMPU(mesh)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, mesh.dp * mesh.cp), mpu=mpu, dist_init_required=False)
    engine.megarnn_param_groups = param_groups
    engine.megarnn_mesh = mesh  # checkpoint.load reshards onto this layout
    _mark_master_copies(engine.optimizer)
    return engine


def _mark_master_copies(wrapper) -> None:
    """bf16 without ZeRO: DeepSpeed steps our optimizer on fp32 copies of the parameters, which
    must say, as the originals do, which are tensor-parallel shards and which a tied pipeline
    copy, or SkipNonFiniteAdamW's global norm would count them wrongly."""
    for lows, masters in zip(getattr(wrapper, "fp16_groups", []), getattr(wrapper, "fp32_groups", [])):
        for low, master in zip(lows, masters):
            for attr in ("tensor_model_parallel", "ds_pipe_replicated"):
                if hasattr(low, attr):
                    setattr(master, attr, getattr(low, attr))
