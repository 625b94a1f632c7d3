"""The one reader of DeepSpeed checkpoint files: every file of a checkpoint -> full tensors by
RecurrentLM name, as if one process had written them.

    meta = read_meta(ckpt_dir, tag)              # megarnn.json (what the checkpoint is)
    weights = read_weights(ckpt_dir, tag)        # {name: fp32 tensor}, any ZeRO stage (megarnn.load,
                                                 # export, tools/inspect_checkpoint.py)
    full = read_full_state(ckpt_dir, tag)        # FullState: weights, Adam moments, counters, client
                                                 # state; ZeRO 0-2 (resharding, megarnn/train/reshard.py)

The files are memory-mapped (torch.load(mmap=True)): opening one reads its pickled structure,
not its tensors. read_full_state's tensors are read on demand, one at a time: full.model[name]
merges that parameter's tensor-parallel pieces (under ZeRO 1-2: the parts of the dp x cp ranks'
flat slices it spans) from the pages that hold them and keeps nothing, so a rank that builds its
new shard tensor by tensor holds that shard plus one source tensor, never the whole checkpoint.

Both find the files with shard_files, name them with name_map (pipeline names -> RecurrentLM
names) and merge the tensor-parallel ranks' tensors as megarnn.json's tp_split records.

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
      (its tail padding cut off) and "base_optimizer_state": Adam's state of that slice. Under
      ZeRO-3 the weights themselves are partitioned there (read with DeepSpeed's zero_to_fp32).
A param group's flat vector is its parameters flattened in param_shapes order (each followed
by "param_alignment_paddings" zeros, none by default), cut into equal dp x cp slices with the
padding at the tail: the slices of all ranks, concatenated, give the parameters back in order
(as deepspeed/utils/zero_to_fp32.py reads them).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from megarnn.errors import CheckpointError
from megarnn.parallel.tensor import merge_shards

META_FILE = "megarnn.json"
MOMENTS = ("exp_avg", "exp_avg_sq")
EARLIER = "resume from an earlier step_* directory"
# Keys of DeepSpeed's model-states file; the others are our client state.
DS_KEYS = {"module", "optimizer", "param_shapes", "lr_scheduler", "global_steps", "global_samples",
           "skipped_steps", "buffer_names", "shared_params", "frozen_param_shapes", "frozen_param_fragments",
           "ds_config", "ds_version", "dp_world_size", "mp_world_size", "data_sampler", "random_ltd"}


class LazyTensors(Mapping):
    """{RecurrentLM name: full fp32 tensor}, each read when asked for and not kept: its
    tensor-parallel pieces (tensors, or functions that read them) merged as tp_split records.
    default(name): the tensor of a name that has no pieces (in `names` only)."""

    def __init__(self, pieces: dict[str, dict[int, torch.Tensor | Callable]], splits: dict,
                 names=None, default: Callable[[str], torch.Tensor] | None = None):
        self._pieces, self._splits, self._default = pieces, splits, default
        self._names = list(pieces) if names is None else list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        by_rank = self._pieces.get(name)
        if by_rank is None:
            if self._default is None or name not in self._names:
                raise KeyError(name)
            return self._default(name)
        if name in self._splits:
            parts = [_value(by_rank[r]) for r in sorted(by_rank)]
            return merge_shards(parts, *self._splits[name]).float()
        return _value(by_rank[min(by_rank)]).float()

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name) -> bool:
        return name in self._pieces or (self._default is not None and name in self._names)

    def __reduce__(self):  # pickled (e.g. to another process) as the plain dict it reads as
        return dict, (dict(self.items()),)


def _value(t):
    return t() if callable(t) else t


@dataclass
class FullState:
    """A checkpoint as one process would see it: tensors by RecurrentLM name, full shapes, fp32,
    each read from the memory-mapped files when indexed (see LazyTensors)."""

    model: Mapping[str, torch.Tensor]
    exp_avg: Mapping[str, torch.Tensor]
    exp_avg_sq: Mapping[str, torch.Tensor]
    optim_step: int  # Adam's step count: applied steps (skipped ones are not counted)
    lr_scheduler: dict | None  # LambdaLR.state_dict()
    global_steps: int  # DeepSpeed's counters
    global_samples: int
    skipped_steps: int
    client: dict  # our client state: step, rng, data, skipped, ...


@dataclass
class ShardFiles:
    """The files of one (pipeline stage, tensor-parallel rank) shard."""

    tp_rank: int
    model: Path  # DeepSpeed's model states
    zero: list[Path]  # ZeRO 1-2: the optimizer slices of the dp x cp ranks, in rank order; [] for ZeRO-0
    layers: list[Path]  # pipeline parallelism, first stage only: this tp rank's layer files (the weights); else []


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    """megarnn.json of checkpoint ckpt_dir/tag; CheckpointError when missing or not JSON."""
    try:
        return json.loads((Path(ckpt_dir) / tag / META_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{Path(ckpt_dir) / tag / META_FILE}: unreadable ({e}); the checkpoint is "
                              f"damaged: {EARLIER}") from None


def layout_of(meta: dict) -> dict:
    """The layout the checkpoint was written with: {"tp", "pp", "cp", "zero_stage"} and "dp" when
    recorded (older checkpoints only have the "parallel" config section)."""
    return {"tp": 1, "pp": 1, "cp": 1, **meta.get("parallel", {}), **meta.get("layout", {})}


def name_map(pp: int, n_layers: int):
    """-> to_lm_name(name): a checkpoint's (or engine's) parameter name -> the RecurrentLM name.

    Identity when the trained module is the RecurrentLM itself; a PipelineModule's names
    ("3.layer.mixer.w", "tied_modules.embed.embed_tokens.weight") map as pipeline.lm_name says."""
    if pp == 1:
        return lambda name: name
    from megarnn.parallel.pipeline import lm_name  # the pipeline code pulls in the models: only when needed
    return lambda name: lm_name(name, n_layers)


def shard_files(d: Path, meta: dict, optimizer: bool = True) -> list[ShardFiles]:
    """Which files hold which tensors: one ShardFiles per (pipeline stage, tensor-parallel rank).
    optimizer=False leaves out the ZeRO optimizer files (weights only, ZeRO 0-2)."""
    layout = layout_of(meta)
    tp, pp, zero = layout["tp"], layout["pp"], layout["zero_stage"]
    out = []
    for r in range(tp * pp):
        model = d / f"mp_rank_{r:02d}_model_states.pt"
        if not model.is_file():
            raise CheckpointError(f"{model}: missing (expected one model file per tensor-parallel rank and "
                                  f"pipeline stage, tp={tp} x pp={pp}); the checkpoint is incomplete: {EARLIER}")
        layers = sorted(d.glob(f"layer_*-model_{r:02d}-model_states.pt")) if pp > 1 and r < tp else []
        zero_files = _zero_files(d, r, layout) if optimizer and zero > 0 else []
        out.append(ShardFiles(r % tp, model, zero_files, layers))
    return out


def _zero_files(d: Path, r: int, layout: dict) -> list[Path]:
    """The ZeRO optimizer files of model rank r, in dp x cp rank order (all must be there)."""
    name = re.compile(rf"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_{r:02d}_optim_states\.pt")  # bf16_: trained in bf16
    found = {int(m.group(1)): f for f in d.iterdir() if (m := name.fullmatch(f.name))}
    want = layout["dp"] * layout["cp"] if "dp" in layout else max(len(found), 1)
    if sorted(found) != list(range(want)):
        raise CheckpointError(f"{d}: the ZeRO-{layout['zero_stage']} optimizer files of model rank {r} are for "
                              f"data x context parallel ranks {sorted(found)}, expected 0..{want - 1}; the "
                              f"checkpoint is incomplete: {EARLIER}")
    return [found[i] for i in range(want)]


_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
_ZERO_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
_MODEL_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")


def source_files(meta: dict) -> list[str]:
    """The manifest's DeepSpeed files (model states, pipeline layers, ZeRO optimizer slices):
    what a reshard reads. Relative paths, sorted."""
    return sorted(rel for rel in meta.get("files", {})
                  if any(p.fullmatch(rel) for p in (_LAYER_FILE, _ZERO_FILE, _MODEL_FILE)))


def rank_files(meta: dict, stage: int, tp_rank: int, dp_rank: int, layers: range | None = None) -> list[str]:
    """The files DeepSpeed reads on the rank at pipeline stage `stage`, tensor-parallel rank
    tp_rank and data x context parallel rank dp_rank when it reloads a checkpoint of its own
    layout: its model-states file (mp rank stage x tp + tp_rank), its ZeRO optimizer slice and,
    under pipeline parallelism, its stage's layer files (`layers`: their indices; None: all of
    its tensor-parallel rank's). Relative paths of the manifest; CheckpointError when the
    model-states file is not in it."""
    tp, files = layout_of(meta)["tp"], meta.get("files", {})
    r = stage * tp + tp_rank
    model = f"mp_rank_{r:02d}_model_states.pt"
    if model not in files:
        raise CheckpointError(f"{model}: not in the checkpoint's {META_FILE}; the checkpoint is incomplete: {EARLIER}")
    out = [model]
    for rel in sorted(files):
        if (m := _ZERO_FILE.fullmatch(rel)) and (int(m.group(1)), int(m.group(2))) == (dp_rank, r):
            out.append(rel)
        elif (m := _LAYER_FILE.fullmatch(rel)) and int(m.group(2)) == tp_rank \
                and (layers is None or int(m.group(1)) in layers):
            out.append(rel)
    return out


def share_of(files: dict[str, dict], names: list[str], rank: int, world: int) -> list[str]:
    """This rank's part of `names` when `world` ranks split the hashing of them: the largest
    file first to the least loaded rank (the same answer on every rank, about equal bytes each)."""
    load, mine = [0] * world, []
    for rel in sorted(names, key=lambda n: (-files[n]["size"], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += files[rel]["size"]
        if r == rank:
            mine.append(rel)
    return mine


def read_weights(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full model's weights, fp32 by RecurrentLM name: from the model files (ZeRO 0-2), the
    pipeline layer files, or ZeRO-3's partitions, tensor-parallel shards merged."""
    d, meta = Path(ckpt_dir) / tag, read_meta(ckpt_dir, tag)
    if layout_of(meta)["zero_stage"] == 3:
        return dict(_merge(_zero3_weights(d, layout_of(meta)["tp"]), meta).items())
    return dict(_merge(_read_shards(d, meta, optimizer=False)[0]["module"], meta).items())


def read_full_state(ckpt_dir: Path, tag: str) -> FullState:
    """Weights and Adam state of a ZeRO 0-2 checkpoint: ZeRO's dp x cp slices concatenated, the
    tensor-parallel ranks' tensors merged, each tensor read when indexed. The weights are the
    optimizer's fp32 masters where it keeps them (ZeRO 1-2, bf16), else the model files' weights."""
    d, meta = Path(ckpt_dir) / tag, read_meta(ckpt_dir, tag)
    if layout_of(meta)["zero_stage"] == 3:
        raise CheckpointError(f"{d}: a ZeRO-3 checkpoint's optimizer state is not read here (it cannot be "
                              "resharded); resume it with the layout it was written with")
    pieces, steps, first = _read_shards(d, meta, optimizer=True)
    if len(steps) > 1:
        raise CheckpointError(f"{d}: the tensor-parallel shards disagree on Adam's step count ({sorted(steps)}); "
                              f"the checkpoint is inconsistent: {EARLIER}")
    for name, by_rank in pieces["module"].items():  # the fp32 masters win over the model files' weights
        pieces["model"][name] = {**by_rank, **pieces["model"].get(name, {})}
    model = _merge(pieces["model"], meta)
    # No state: the parameter was never updated (zeros of its shape).
    moments = {k: LazyTensors(pieces[k], meta.get("tp_split", {}), names=list(model),
                              default=lambda n: torch.zeros_like(model[n])) for k in MOMENTS}
    return FullState(model=model, exp_avg=moments["exp_avg"], exp_avg_sq=moments["exp_avg_sq"],
                     optim_step=steps.pop() if steps else 0, lr_scheduler=first.get("lr_scheduler"),
                     global_steps=first["global_steps"], global_samples=first.get("global_samples", 0),
                     skipped_steps=first.get("skipped_steps", 0),
                     client={k: v for k, v in first.items() if k not in DS_KEYS})


def _read_shards(d: Path, meta: dict, optimizer: bool) -> tuple[dict, set[int], dict]:
    """Every shard's tensors -> ({"module" | "model" | "exp_avg" | "exp_avg_sq": {RecurrentLM name:
    {tp rank: tensor, memory-mapped, or a function that reads it}}}, Adam step counts, the first
    model-states file). "module": the model files' (or pipeline layer files') weights; "model":
    the optimizer's fp32 masters (optimizer=True)."""
    layout = layout_of(meta)
    to_lm_name = name_map(layout["pp"], meta["model"]["n_layers"])
    pieces: dict[str, dict[str, dict[int, torch.Tensor]]] = {k: {} for k in ("module", "model", *MOMENTS)}
    steps, first = set(), {}
    for files in shard_files(d, meta, optimizer):
        if not optimizer and layout["pp"] > 1 and not files.layers:
            continue  # weights only: a pipeline's weights are all in the layer files
        states = _load(files.model) if optimizer or not files.layers else {}
        first = first or states
        module = _layer_weights(files.layers) if files.layers else states.get("module") or {}
        tensors = {"module": dict(module)}
        if optimizer:
            found, step = _read_zero(states, files.zero) if files.zero else _read_torch_adam(states, files.model)
            tensors.update(found)
            steps.add(step)
        for key, by_name in tensors.items():
            for name, t in by_name.items():
                pieces[key].setdefault(to_lm_name(name), {})[files.tp_rank] = t
    return pieces, steps, first


def _merge(by_name: dict[str, dict[int, torch.Tensor | Callable]], meta: dict) -> LazyTensors:
    """{name: {tp rank: tensor or reader}} -> {name: full fp32 tensor}, read when indexed: cut
    parameters joined as tp_split records (dim, component sizes); a replicated one is the same
    on every rank."""
    return LazyTensors(by_name, meta.get("tp_split", {}))


def _load(f: Path) -> dict:
    """A checkpoint file, its tensors memory-mapped (the zipfile format; older files are read whole)."""
    try:  # our own files: they hold DeepSpeed objects
        try:
            return torch.load(f, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as e:
            if "zip" not in str(e).lower():
                raise
            return torch.load(f, map_location="cpu", weights_only=False)  # the legacy format cannot be mapped
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"{f}: unreadable ({e}); {EARLIER}") from None


def _layer_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """Pipeline layer files -> {pipeline name "3.layer.mixer.w": tensor} (the layer index in front)."""
    out = {}
    for f in files:
        m = re.fullmatch(r"layer_(\d+)-model_\d+-model_states\.pt", f.name)
        if m is None:
            raise CheckpointError(f"{f}: unexpected pipeline layer file name; expected "
                                  "layer_XX-model_YY-model_states.pt")
        out.update({f"{int(m.group(1))}.{k}": v for k, v in _load(f).items()})
    return out


def _zero3_weights(d: Path, tp: int) -> dict[str, dict[int, torch.Tensor]]:
    """ZeRO-3 keeps every weight partitioned over the data-parallel ranks, in the optimizer files.
    DeepSpeed's zero_to_fp32 gathers them for one tensor-parallel rank at a time, reading the
    names of rank 0: each rank's files are shown to it under those names (symbolic links).
    -> {name: {tp rank: tensor}}."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    out: dict[str, dict[int, torch.Tensor]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(tp):
            view = Path(tmp) / f"tp_rank_{r}"
            view.mkdir()
            for f in d.glob(f"*mp_rank_{r:02d}_*.pt"):
                (view / f.name.replace(f"mp_rank_{r:02d}", "mp_rank_00")).symlink_to(f.resolve())
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines are not ours to print
                sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag=view.name)
            for name, t in sd.items():
                out.setdefault(name, {})[r] = t
    return out


def _read_torch_adam(states: dict, where: Path) -> tuple[dict, int]:
    """ZeRO-0: Adam's state by parameter index, named by our client state's "param_groups".
    -> ({"model": fp32 masters (bf16 only) | "exp_avg" | "exp_avg_sq": {name: tensor}}, step);
    a parameter without state (never updated) is left out.

    In bf16 DeepSpeed's FP16_UnfusedOptimizer wraps ours: "optimizer" is then {"optimizer_state_dict":
    ours, "fp32_groups": the fp32 master weights, per group in the same order}."""
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
    out: dict[str, dict[str, torch.Tensor]] = {"model": {}, **{k: {} for k in MOMENTS}}
    for group_masters, group_names in zip(masters or [], names):  # bf16: the fp32 weights, not the rounded ones
        out["model"].update({name: t.detach() for name, t in zip(group_names, group_masters)})
    steps = set()
    for group, group_names in zip(opt["param_groups"], names):
        for index, name in zip(group["params"], group_names):
            state = opt["state"].get(index, {})
            for k in MOMENTS:
                if k in state:
                    out[k][name] = state[k]
            steps.add(int(state.get("step", 0)))
    return out, max(steps, default=0)


def _read_zero(states: dict, files: list[Path]) -> tuple[dict, int]:
    """ZeRO 1-2: the fp32 weights and Adam moments of every param group, from the dp x cp ranks'
    flat slices. -> ({"model" | "exp_avg" | "exp_avg_sq": {name: function reading its tensor}},
    step); each function reads the parameter's range of the flat vector from the slices it spans."""
    parts = [_load(f)["optimizer_state_dict"] for f in files]
    out: dict[str, dict[str, Callable]] = {"model": {}, **{k: {} for k in MOMENTS}}
    steps = set()
    for g, shapes in enumerate(states["param_shapes"]):
        flat = {"model": [], **{k: [] for k in MOMENTS}}
        for sd in parts:
            weights = sd["single_partition_of_fp32_groups"][g].detach()  # saved with requires_grad
            state = _group_state(sd, g)
            flat["model"].append(weights)
            for k in MOMENTS:  # the moments keep the tail padding the weights were saved without
                flat[k].append(state[k].detach()[:weights.numel()] if k in state else None)
            steps.add(int(state.get("step", 0)))
        paddings = parts[0].get("param_alignment_paddings")  # zero_optimization.parameter_alignment
        paddings = paddings[g] if paddings else [0] * len(shapes)
        for key, slices in flat.items():
            out[key].update(_cut(_FlatSlices(slices, flat["model"]), shapes, paddings, files[0], g))
    return out, max(steps, default=0)


class _FlatSlices:
    """A param group's flat vector as the dp x cp ranks' slices of it (memory-mapped); a slice
    that is None (no Adam state yet) reads as zeros. read(a, b) -> values [a, b), fp32."""

    def __init__(self, slices: list, like: list[torch.Tensor]):
        self.slices, self.sizes = slices, [w.numel() for w in like]
        self.numel = sum(self.sizes)

    def read(self, a: int, b: int) -> torch.Tensor:
        out, start = [], 0
        for t, n in zip(self.slices, self.sizes):
            lo, hi = max(a, start), min(b, start + n)
            if lo < hi:
                out.append(torch.zeros(hi - lo) if t is None else t[lo - start:hi - start].float())
            start += n
        return out[0] if len(out) == 1 else torch.cat(out)


def _group_state(sd: dict, g: int) -> dict:
    """Adam's state of param group g's flat slice (empty before the first step)."""
    base = sd["base_optimizer_state"]
    if isinstance(base, list):  # zero_optimization.elastic_checkpoint: one state per group, padding cut
        return base[g]
    return base["state"].get(base["param_groups"][g]["params"][0], {})


def _cut(flat: _FlatSlices, shapes: dict, paddings: list[int], where: Path, g: int) -> dict[str, Callable]:
    """A param group's flat vector -> {name: function reading its tensor, of its shape}, in
    param_shapes order."""
    out, offset = {}, 0
    for (name, shape), pad in zip(shapes.items(), paddings):
        n = math.prod(shape)
        if offset + n > flat.numel:
            raise CheckpointError(f"{where}: param group {g} holds {flat.numel} values, fewer than its "
                                  f"parameters need; the checkpoint is damaged: {EARLIER}")
        out[name] = lambda a=offset, b=offset + n, shape=tuple(shape): flat.read(a, b).view(shape)
        offset += n + pad
    return out
