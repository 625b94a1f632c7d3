"""Resume a checkpoint on another layout: tensor-parallel size, data x context parallel ranks
and ZeRO stage (0, 1, 2) may all change.

DeepSpeed reloads only the layout it wrote (ZeRO 1-2 only on as many dp x cp ranks), so a
change goes through the full, unsharded state of the checkpoint:

    full = read_full_state(ckpt_dir, tag)      # every file -> FullState (as if one process wrote it)
    client = load_full_state(engine, full, mesh)   # this rank's slices -> weights, Adam state,
                                                   # LR schedule, step counters, RNG

What DeepSpeed writes (tensor-parallel rank t, pipeline stage s, r = s x tp + t, data x context
parallel rank d):
  mp_rank_{r:02d}_model_states.pt   "module": rank r's weights (written by dp rank 0; None under
      pipeline parallelism, whose weights are in layer_{i:02d}-model_{t:02d}-model_states.pt, one
      file per layer of megarnn/parallel/pipeline.py and tp rank, keys relative to the layer);
      "optimizer": under ZeRO-0 our SkipNonFiniteAdamW's state_dict, states by parameter index
      in param-group order (our client state "param_groups" names them); "param_shapes": under
      ZeRO 1-2 each param group's {name: shape} in flat order; "lr_scheduler", "global_steps",
      "global_samples", "skipped_steps"; and our client state (step, rng, data, ...).
  [bf16_]zero_pp_rank_{d}_mp_rank_{r:02d}_optim_states.pt   ZeRO 1-2, "optimizer_state_dict":
      "single_partition_of_fp32_groups": rank d's slice of each param group's flat fp32 vector
      (its tail padding cut off) and "base_optimizer_state": Adam's state of that slice.
A param group's flat vector is its parameters flattened in param_shapes order (each followed
by "param_alignment_paddings" zeros, none by default), cut into equal dp x cp slices with the
padding at the tail: the slices of all ranks, concatenated, give the parameters back in order
(as deepspeed/utils/zero_to_fp32.py reads them).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megarnn.errors import CheckpointError
from megarnn.parallel.tensor import merge_shards, shard
from megarnn.train.checkpoint import read_meta, set_rng_state

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class FullState:
    """A checkpoint as one process would hold it: tensors by RecurrentLM name, full shapes, fp32."""

    model: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    optim_step: int  # Adam's step count: applied steps (skipped ones are not counted)
    lr_scheduler: dict | None  # LambdaLR.state_dict()
    global_steps: int  # DeepSpeed's counters
    global_samples: int
    skipped_steps: int
    client: dict  # our client state: step, rng, data, skipped, ...


@dataclass
class ShardFiles:
    """The files of one tensor-parallel rank's shard."""

    tp_rank: int
    model: Path  # DeepSpeed's model states
    zero: list[Path]  # ZeRO 1-2: the optimizer slices of the dp x cp ranks, in rank order; [] for ZeRO-0
    layers: list[Path]  # pipeline parallelism: this tp rank's layer files (the weights); else []


def name_map(pp: int, n_layers: int):
    """-> to_lm_name(name): a checkpoint's (or engine's) parameter name -> the RecurrentLM name.

    Identity when the trained module is the RecurrentLM itself; a PipelineModule's names
    ("3.layer.mixer.w", "tied_modules.embed.embed_tokens.weight") map as pipeline.lm_name says."""
    if pp == 1:
        return lambda name: name
    from megarnn.parallel.pipeline import lm_name
    return lambda name: lm_name(name, n_layers)


def shard_files(d: Path, meta: dict) -> list[ShardFiles]:
    """Which files hold which tensors: one ShardFiles per (pipeline stage, tensor-parallel rank)."""
    layout = meta.get("layout", {})
    tp, pp = layout.get("tp", meta["parallel"]["tp"]), layout.get("pp", meta["parallel"].get("pp", 1))
    zero = layout.get("zero_stage", meta["parallel"]["zero_stage"])
    out = []
    for r in range(tp * pp):
        layers = sorted(d.glob(f"layer_*-model_{r % tp:02d}-model_states.pt")) if pp > 1 else []
        model = d / f"mp_rank_{r:02d}_model_states.pt"
        if not model.is_file():
            raise CheckpointError(f"{model}: missing (expected one model file per tensor-parallel rank, "
                                  f"tp={tp}); the checkpoint is incomplete: resume from an earlier step_* directory")
        zero_files = []
        if zero > 0:  # named by the rank in the dp x cp group; "bf16_" in front when trained in bf16
            name = re.compile(rf"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_{r:02d}_optim_states\.pt")
            found = {int(m.group(1)): f for f in d.iterdir() if (m := name.fullmatch(f.name))}
            want = layout["dp"] * layout.get("cp", 1) if "dp" in layout else max(len(found), 1)
            if sorted(found) != list(range(want)):
                raise CheckpointError(f"{d}: the ZeRO-{zero} optimizer files of tensor-parallel rank {r} are for "
                                      f"data x context parallel ranks {sorted(found)}, expected 0..{want - 1}; the "
                                      "checkpoint is incomplete: resume from an earlier step_* directory")
            zero_files = [found[i] for i in range(want)]
        out.append(ShardFiles(r % tp, model, zero_files, layers))
    return out


def read_full_state(ckpt_dir: Path, tag: str) -> FullState:
    """Merge a checkpoint's shards into full fp32 weights and Adam moments: ZeRO's dp x cp slices
    by concatenation, the tensor-parallel ranks' tensors as megarnn.json's tp_split records say.
    Every file is found by shard_files and every name goes through to_lm_name."""
    d = ckpt_dir / tag
    meta = read_meta(ckpt_dir, tag)
    to_lm_name = name_map(meta.get("layout", {}).get("pp", meta["parallel"].get("pp", 1)), meta["model"]["n_layers"])
    splits = meta.get("tp_split", {})
    # {"model" | "exp_avg" | "exp_avg_sq": {RecurrentLM name: {tp rank: tensor}}}
    pieces: dict[str, dict[str, dict[int, torch.Tensor]]] = {"model": {}, **{k: {} for k in MOMENTS}}
    steps, first = set(), None
    for files in shard_files(d, meta):
        states = _load(files.model)
        first = first or states
        if files.layers:  # pipeline: the weights are in per-layer files, keys relative to the layer
            states = {**states, "module": _layer_weights(files.layers)}
        if files.zero:
            tensors, step = _read_zero(states, files.zero)
        else:
            tensors, step = _read_torch_adam(states, files.model)
        steps.add(step)
        for key, by_name in tensors.items():
            for name, t in by_name.items():
                pieces[key].setdefault(to_lm_name(name), {})[files.tp_rank] = t
    if len(steps) > 1:
        raise CheckpointError(f"{d}: the tensor-parallel shards disagree on Adam's step count ({sorted(steps)}); "
                              "the checkpoint is inconsistent: resume from an earlier step_* directory")

    def merged(name: str, by_rank: dict[int, torch.Tensor]) -> torch.Tensor:
        if name not in splits:  # replicated: every tp rank holds the same tensor
            return by_rank[min(by_rank)]
        return merge_shards([by_rank[r] for r in sorted(by_rank)], *splits[name])

    full = {key: {n: merged(n, by_rank) for n, by_rank in by_name.items()} for key, by_name in pieces.items()}
    ds_keys = {"module", "optimizer", "param_shapes", "lr_scheduler", "global_steps", "global_samples",
               "skipped_steps", "buffer_names", "shared_params", "frozen_param_shapes", "frozen_param_fragments",
               "ds_config", "ds_version", "dp_world_size", "mp_world_size", "data_sampler", "random_ltd"}
    return FullState(model=full["model"], exp_avg=full["exp_avg"], exp_avg_sq=full["exp_avg_sq"],
                     optim_step=steps.pop(), lr_scheduler=first.get("lr_scheduler"),
                     global_steps=first["global_steps"],
                     global_samples=first.get("global_samples", 0), skipped_steps=first.get("skipped_steps", 0),
                     client={k: v for k, v in first.items() if k not in ds_keys})


def _load(f: Path) -> dict:
    try:
        return torch.load(f, map_location="cpu", weights_only=False)  # our own files: they hold DeepSpeed objects
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{f}: unreadable ({e}); resume from an earlier step_* directory") from None


def _layer_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """Pipeline layer files -> {pipeline name "3.layer.mixer.w": tensor} (the layer index in front)."""
    out = {}
    for f in files:
        idx = int(re.match(r"layer_(\d+)-", f.name).group(1))
        out.update({f"{idx}.{k}": v for k, v in _load(f).items()})
    return out


def _read_torch_adam(states: dict, where: Path) -> tuple[dict, int]:
    """ZeRO-0: weights from "module", Adam's state by parameter index, named by our client state's
    "param_groups". -> ({"model" | "exp_avg" | "exp_avg_sq": {name: tensor}}, step).

    In bf16 DeepSpeed's FP16_UnfusedOptimizer wraps ours: "optimizer" is then {"optimizer_state_dict":
    ours, "fp32_groups": the fp32 master weights, per group in the same order}."""
    weights = {n: t.float() for n, t in states["module"].items()}
    opt, names, masters = states.get("optimizer"), states.get("param_groups"), None
    if isinstance(opt, dict) and "fp32_groups" in opt and "optimizer_state_dict" in opt:
        masters, opt = opt["fp32_groups"], opt["optimizer_state_dict"]
    if not isinstance(opt, dict) or "state" not in opt:
        raise CheckpointError(f"{where}: its optimizer state is neither a torch optimizer's state_dict nor "
                              "DeepSpeed's bf16 wrapper of one; it cannot be resharded: resume with the layout it "
                              "was written with")
    if names is None or [len(n) for n in names] != [len(g["params"]) for g in opt["param_groups"]]:
        raise CheckpointError(f"{where}: the optimizer's parameter names are not recorded (a checkpoint written "
                              "before resharding existed); resume with the layout it was written with")
    for group_masters, group_names in zip(masters or [], names):  # bf16: the fp32 weights, not the rounded ones
        weights.update({name: t.detach().float() for name, t in zip(group_names, group_masters)})
    out: dict[str, dict[str, torch.Tensor]] = {"model": weights, **{k: {} for k in MOMENTS}}
    steps = set()
    for group, group_names in zip(opt["param_groups"], names):
        for index, name in zip(group["params"], group_names):
            state = opt["state"].get(index, {})  # empty: the parameter was never updated
            for k in MOMENTS:
                out[k][name] = state[k].float() if k in state else torch.zeros_like(weights[name])
            steps.add(int(state.get("step", 0)))
    return out, max(steps, default=0)


def _read_zero(states: dict, files: list[Path]) -> tuple[dict, int]:
    """ZeRO 1-2: the fp32 weights and Adam moments of every param group, from the dp x cp ranks'
    flat slices. -> ({"model" | "exp_avg" | "exp_avg_sq": {name: tensor}}, step)."""
    parts = [_load(f)["optimizer_state_dict"] for f in files]
    # Parameters outside the optimizer (none today) keep the weights of "module".
    out: dict[str, dict[str, torch.Tensor]] = {"model": {n: t.float() for n, t in states["module"].items()},
                                              **{k: {} for k in MOMENTS}}
    steps = set()
    for g, shapes in enumerate(states["param_shapes"]):
        flat = {"model": [], **{k: [] for k in MOMENTS}}
        for sd in parts:
            weights = sd["single_partition_of_fp32_groups"][g].detach().float()  # saved with requires_grad
            state = _group_state(sd, g)
            flat["model"].append(weights)
            for k in MOMENTS:  # the moments keep the tail padding the weights were saved without
                moment = state[k][:weights.numel()].detach().float() if k in state else torch.zeros_like(weights)
                flat[k].append(moment)
            steps.add(int(state.get("step", 0)))
        paddings = parts[0].get("param_alignment_paddings")  # zero_optimization.parameter_alignment
        paddings = paddings[g] if paddings else [0] * len(shapes)
        for key, slices in flat.items():
            out[key].update(_cut(torch.cat(slices), shapes, paddings, files[0], g))
    return out, max(steps, default=0)


def _group_state(sd: dict, g: int) -> dict:
    """Adam's state of param group g's flat slice (empty before the first step)."""
    base = sd["base_optimizer_state"]
    if isinstance(base, list):  # zero_optimization.elastic_checkpoint: one state per group, padding cut
        return base[g]
    return base["state"].get(base["param_groups"][g]["params"][0], {})


def _cut(flat: torch.Tensor, shapes: dict, paddings: list[int], where: Path, g: int) -> dict[str, torch.Tensor]:
    """A param group's flat vector -> {name: tensor of its shape}, in param_shapes order."""
    out, offset = {}, 0
    for (name, shape), pad in zip(shapes.items(), paddings):
        n = math.prod(shape)
        if offset + n > flat.numel():
            raise CheckpointError(f"{where}: param group {g} holds {flat.numel()} values, fewer than its "
                                  "parameters need; the checkpoint is damaged: resume from an earlier step_* directory")
        out[name] = flat[offset:offset + n].view(shape).clone()
        offset += n + pad
    return out


def load_full_state(engine, full: FullState, mesh) -> dict:
    """Put this rank's share of `full` into `engine`; returns our client state.

    Weights: this rank's tensor-parallel slice of each, into the parameters (under ZeRO also
    into the fp32 master slice). Adam: exp_avg, exp_avg_sq and step into the torch optimizer's
    per-parameter state (ZeRO-0) or into the state of ZeRO's flat fp32 slices (ZeRO 1-2). Then
    the LR schedule, DeepSpeed's step counters and the RNG.
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
    set_rng_state(full.client["rng"])
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
    slices of exp_avg / exp_avg_sq into Adam's state of that slice."""
    for i, params in enumerate(zero.round_robin_bit16_groups):
        offsets = getattr(zero, "round_robin_bit16_offsets", None)  # absent in older DeepSpeed: packed
        offsets = offsets[i] if offsets else [sum(p.numel() for p in params[:j]) for j in range(len(params))]
        rank = dist.get_rank(group=zero.real_dp_process_group[i])
        master = zero.single_partition_of_fp32_groups[i]

        def my_slice(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
            flat = torch.zeros(zero.bit16_groups_flat[i].numel(), dtype=torch.float32)
            for p, offset in zip(params, offsets):
                flat[offset:offset + p.numel()] = local(tensors, p).flatten()
            return zero.get_data_parallel_partitions(flat, i)[rank]  # DeepSpeed's own cut of the flat vector

        master.data.copy_(my_slice(full.model))
        if full.optim_step > 0:
            zero.optimizer.state[master] = _adam_state(full.optim_step, my_slice(full.exp_avg),
                                                       my_slice(full.exp_avg_sq), master)

