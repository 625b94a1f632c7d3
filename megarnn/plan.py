"""megarnn plan: what each rank of a layout holds and sends, without the memory.

    megarnn plan CONFIG [key=value ...] --world-size N [--json]
    megarnn plan CONFIG [key=value ...] --world-size N --rank R --materialize

For each pipeline stage (ranks of a stage hold the same shapes: tensor-parallel shards are
equal, data / context replicas identical) the real rank's model is built as training builds it
(megarnn/parallel/construct.py: the same passes, the same pipeline partition) but on the meta
device, inside PyTorch's fake process group (a world of N ranks in one process, collectives that
do nothing), as torchtitan's memory estimator does. From it:

  weights, grads     this rank's parameters x 2 bytes (bf16) or 4 (fp32); grads / (dp x cp) under ZeRO 2-3
  optimizer          fp32 master (bf16 only) + Adam's two moments, / (dp x cp) under ZeRO 1-3
  activations        the bytes autograd saves in one micro batch's forward, counted on meta tensors
                     (saved-tensor hooks), x the micro batches in flight on the stage under 1F1B
                     (min(pp - stage, grad_accum)); "activations_checkpointed" with every block recomputed
  comm_bytes_per_step  tp: megarnn/parallel/comm.py's closed form for the stage's blocks; cp: the scan
                     carries and conv / attention halos; pp: the activation to the next stage and its
                     gradient back; dp: the gradient reduction over dp x cp (ring: 2 (n-1)/n x bytes)
  checkpoint_bytes   what the stage's dp-rank-0 writes (its weights) plus its optimizer slice

--materialize builds rank R for real on the CPU (its pieces only, fp32), runs one forward and
backward on random tokens and reports the measured peak resident memory of the process.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from megarnn.errors import ConfigError


def _ring(n: int) -> float:
    return 2 * (n - 1) / n if n > 1 else 0.0


@contextlib.contextmanager
def fake_world(rank: int, world_size: int):
    """torch.distributed with the fake backend: rank `rank` of `world_size`, collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


class SavedBytes:
    """Bytes autograd saves for backward while active: each saved tensor's storage counted once
    (views of one tensor, saved by several ops, share it; parameters are not activations)."""

    def __init__(self):
        self.total, self._seen = 0, {}

    def pack(self, t):
        base = t if t._base is None else t._base
        if id(base) not in self._seen and not isinstance(base, torch.nn.Parameter):
            self._seen[id(base)] = base  # kept alive: its id is not reused
            self.total += base.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _stage_forward(model, owned: set[str], tokens, dtype, first: bool, last: bool) -> torch.Tensor:
    """This stage's share of one micro batch's forward (+ the loss on the last stage) -> a scalar."""
    n, T = len(model.layers), tokens.shape[1]
    reset, pos0 = model.begin(tokens, None, None)
    pos = model.positions(pos0, T, tokens.device)
    if first:
        x = model.embed(tokens).to(dtype)
    else:  # the previous stage's activation arrives (T / tp steps of it under sequence parallelism)
        lay = getattr(model, "layout", None)
        steps = T // dist.get_world_size(lay.tp_group) if lay is not None and lay.sequence_parallel else T
        x = torch.zeros(tokens.shape[0], steps, model.c.d_model, device=tokens.device, dtype=dtype,
                        requires_grad=True)
    for i in range(n):
        if f"layers.{i}" in owned:
            x, _ = model.run_layer(i, x, reset, None, pos)
    if last:
        return model.cross_entropy(model.logits(model.final_norm(x)), tokens).mean()
    return x.float().sum()


def _activation_bytes(model, owned, micro_batch, seq_len, cp, dtype, checkpoint_every, first, last) -> int:
    model.checkpoint_every = checkpoint_every
    tokens = torch.zeros(micro_batch, seq_len // cp, dtype=torch.long, device="meta")
    with SavedBytes() as saved:
        _stage_forward(model, owned, tokens, dtype, first, last)
    model.checkpoint_every = 0
    return saved.total


def _cp_bytes(c, letters: str, B: int, T: int, cp: int, tp: int, act: int) -> float:
    """Per micro batch, forward + backward: each block kind's carries all-gathered (every rank
    receives the other cp - 1 ranks' share) and halos / state shifts sent (registry cp_exchange)."""
    if cp == 1:
        return 0.0
    from megarnn import registry
    total = 0.0
    for letter in letters:
        kind = registry.block_kind(letter, c)
        gathered, sent = kind.cp_exchange(c, act)
        total += B * (gathered * 4 * (cp - 1) + sent) / (tp if kind.cp_tp_split else 1)
    return total


def _entry(cfg, world: int, stage: int, ranks: list[int]) -> dict:
    """One pipeline stage's figures (rank ranks[0] built on the meta device)."""
    from megarnn.parallel.comm import tp_bytes_per_micro_batch
    from megarnn.parallel.construct import build_local
    from megarnn.parallel.mesh import ParallelMesh

    p, t = cfg.parallel, cfg.train
    bf16 = t.precision != "fp32"
    act = 2 if bf16 else 4
    with fake_world(ranks[0], world):
        mesh = ParallelMesh.build(p.tp, p.pp, p.cp)
        model, owned, _ = build_local(cfg.model, mesh, t.seed, p, real=False)
        params = sum(q.numel() for name in owned for q in model.get_submodule(name).parameters())
        B, T, dpcp = t.micro_batch_size, cfg.data.seq_len, mesh.dp * mesh.cp
        dtype = torch.bfloat16 if bf16 else torch.float32
        in_flight = min(p.pp - stage, t.grad_accum)
        ends = (stage == 0, stage == p.pp - 1)
        full = _activation_bytes(model, owned, B, T, p.cp, dtype, 0, *ends) * in_flight
        ckpt = _activation_bytes(model, owned, B, T, p.cp, dtype, 1, *ends) * in_flight
        layers = [i for i in range(len(model.layers)) if f"layers.{i}" in owned]
        letters = "".join(model.c.block_types()[i] for i in layers)
    weights = params * act
    grads = params * act / (dpcp if p.zero_stage >= 2 else 1)
    optimizer = params * (12 if bf16 else 8) / (dpcp if p.zero_stage >= 1 else 1)
    if p.zero_stage >= 3:
        weights /= dpcp
    c = model.c
    tp = tp_bytes_per_micro_batch(c, B, T, p.tp, p.cp, p.sequence_parallel, act, layers=layers,
                                  first=stage == 0, last=stage == p.pp - 1)["total"]
    boundaries = (stage > 0) + (stage < p.pp - 1)
    pp_bytes = boundaries * B * (T // p.cp) * c.d_model * act / (1 if p.sequence_parallel else p.tp)
    comm = {"tp": tp * t.grad_accum, "cp": _cp_bytes(c, letters, B, T, p.cp, p.tp, act) * t.grad_accum,
            "pp": pp_bytes * t.grad_accum, "dp": _ring(dpcp) * params * 4}
    return {"ranks": ranks, "stage": stage, "params": params, "pieces": len(owned),
            "bytes": {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": full,
                      "activations_checkpointed": ckpt, "total": weights + grads + optimizer + full},
            "comm_bytes_per_step": comm, "checkpoint_bytes": weights + optimizer}


def load_plan_config(path: str, overrides: list[str]):
    """A training config, or a model file alone (configs/model/*.yaml) with the defaults for the rest."""
    from pathlib import Path

    from megarnn.config import Config, _apply_override, _read_yaml

    path = Path(path)
    data = _read_yaml(path)
    if "model" not in data and ("family" in data or "d_model" in data):
        data = {"model": data}
    elif isinstance(data.get("model"), str):
        from megarnn.config import _read_model_file
        data["model"] = _read_model_file(data["model"], path.parent)
    for item in overrides:
        _apply_override(data, item, path.parent)
    d = data.setdefault("data", {})
    if not any(d.get(k) for k in ("train_files", "shards", "stream")):
        d["train_files"] = ["(megarnn plan reads no data)"]
    return Config.from_dict(data)


def plan(cfg, world_size: int) -> dict:
    """{"world_size", "layout", "ranks": [one entry per pipeline stage]} (module docstring)."""
    p = cfg.parallel
    mp = p.tp * p.pp * p.cp
    if world_size < 1 or world_size % mp:
        raise ConfigError(f"--world-size {world_size} is not a multiple of parallel.tp x pp x cp = {mp}")
    if not cfg.model.vocab_size:
        from megarnn.train.loop import padded_vocab
        cfg.model.vocab_size = padded_vocab(cfg.data.vocab_size)
    cfg.model.check_tensor_parallel(p.tp)
    per_stage = world_size // p.pp
    entries = [_entry(cfg, world_size, s, list(range(s * per_stage, (s + 1) * per_stage))) for s in range(p.pp)]
    layout = {"tp": p.tp, "pp": p.pp, "cp": p.cp, "dp": world_size // mp, "zero_stage": p.zero_stage,
              "sequence_parallel": p.sequence_parallel, "precision": "fp32" if cfg.train.precision == "fp32" else "bf16", "micro_batch_size": cfg.train.micro_batch_size, "seq_len": cfg.data.seq_len,
              "grad_accum": cfg.train.grad_accum}
    return {"world_size": world_size, "layout": layout, "ranks": entries}


def materialize(cfg, world_size: int, rank: int) -> dict:
    """Build rank `rank` for real on the CPU (fp32; its pieces only), run one forward and backward
    on random tokens -> {"rank", "params", "measured_peak_bytes", "seconds"}: the peak resident
    memory of this process during build + step, above what it held before."""
    from megarnn.parallel.construct import build_local
    from megarnn.parallel.mesh import ParallelMesh

    p, t = cfg.parallel, cfg.train
    if not cfg.model.vocab_size:
        from megarnn.train.loop import padded_vocab
        cfg.model.vocab_size = padded_vocab(cfg.data.vocab_size)
    before = _reset_peak()
    start = time.perf_counter()
    with fake_world(rank, world_size):
        mesh = ParallelMesh.build(p.tp, p.pp, p.cp)
        model, owned, _ = build_local(cfg.model, mesh, t.seed, p)
        params = sum(q.numel() for name in owned for q in model.get_submodule(name).parameters())
        tokens = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len // p.cp))
        stage = mesh.rank_in("pp")
        _stage_forward(model, owned, tokens, torch.float32, stage == 0, stage == p.pp - 1).backward()
    return {"rank": rank, "params": params, "measured_peak_bytes": max(_rss_peak() - before, 0),
            "seconds": time.perf_counter() - start}


def _status(key: str) -> int:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> int:
    """Reset the process's peak resident memory (Linux: clear_refs 5) -> the resident memory now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak since the process started is measured: an upper bound
    return _status("VmRSS")


def _rss_peak() -> int:
    return _status("VmHWM")


def format_plan(result: dict) -> str:
    gb = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    lay = result["layout"]
    lines = [f"world {result['world_size']}: tp {lay['tp']} x pp {lay['pp']} x cp {lay['cp']} x dp {lay['dp']}, "
             f"ZeRO-{lay['zero_stage']}, {lay['precision']}, micro batch {lay['micro_batch_size']} x "
             f"{lay['seq_len']} tokens, {lay['grad_accum']} per step; GiB per rank",
             f"{'ranks':<14}{'params':>10}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'(ckpt)':>8}"
             f"{'total':>8}{'tp GiB':>8}{'cp GiB':>8}{'pp GiB':>8}{'dp GiB':>8}{'ckpt GiB':>9}"]
    for e in result["ranks"]:
        b, c = e["bytes"], e["comm_bytes_per_step"]
        ranks = f"{e['ranks'][0]}-{e['ranks'][-1]}" if len(e["ranks"]) > 1 else str(e["ranks"][0])
        lines.append(f"{ranks:<14}{e['params'] / 1e9:>9.3f}B{gb(b['weights']):>9}"
                     f"{gb(b['grads']):>8}{gb(b['optimizer']):>8}{gb(b['activations']):>8}"
                     f"{gb(b['activations_checkpointed']):>8}{gb(b['total']):>8}{gb(c['tp']):>8}{gb(c['cp']):>8}"
                     f"{gb(c['pp']):>8}{gb(c['dp']):>8}{gb(e['checkpoint_bytes']):>9}")
    return "\n".join(lines)
