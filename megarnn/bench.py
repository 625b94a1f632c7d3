"""`megarnn bench`: how fast a config trains, and how fast the kernels run.

    megarnn bench step CONFIG.yaml [key=value ...] [--steps 10] [--warmup 3]
    torchrun --nproc_per_node 8 -m megarnn bench step CONFIG.yaml parallel.tp=2   # a layout
    megarnn bench kernels [tools/bench_kernels.py arguments]

`step` builds the model, the parallel layout and the DeepSpeed engine exactly as `megarnn
train` does and times whole optimizer steps (train.grad_accum micro batches of
train.micro_batch_size x data.seq_len tokens per data-parallel rank) on random tokens: nothing
is read or written, so it needs no data and leaves no run directory. It prints one line per
timed step and a summary: tokens per second (all ranks), MFU (against train.peak_tflops or
the known peak of the GPU), and the peak memory of rank 0; then one more, untimed step under a
counter of host syncs (count_host_syncs: the Tensor methods that read a value on the host), with
where they come from. `kernels` runs
tools/bench_kernels.py from the checkout (kernel time against the roofline and peers).
"""
from __future__ import annotations

import collections
import contextlib
import resource
import runpy
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from megarnn.errors import ConfigError


class RandomBatches:
    """Stands in for the data loader: micro batch (step, micro) of uniformly random tokens, the
    same on every tensor / context parallel rank of a replica (seeded by step, micro and dp rank)."""

    def __init__(self, vocab_size: int, seq_len: int, micro_batch: int, dp_rank: int):
        self.vocab_size, self.seq_len, self.mb, self.dp_rank = vocab_size, seq_len, micro_batch, dp_rank

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed((step * 1_000 + micro) * 1_000 + self.dp_rank)
        seq = torch.randint(0, self.vocab_size, (self.mb, self.seq_len + 1), generator=g)
        reset = torch.zeros(self.mb, self.seq_len, dtype=torch.bool)
        return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "reset": reset,
                "loss_mask": torch.ones(self.mb, self.seq_len, dtype=torch.bool)}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


# The Tensor methods that hand a value to the host: on a GPU each waits for the device (a sync).
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def count_host_syncs():
    """Inside the block, count the calls of SYNC_METHODS on tensors that are not on the CPU's "meta"
    device -> a Counter {"method  file:line (function)": calls}, the call site being the first
    frame outside torch. On a GPU, calls on CUDA tensors are syncs; on CPU the same call sites are
    counted (those that would be syncs on a GPU, plus reads of CPU-side tensors)."""
    counts: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def site() -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/torch/" not in frame.filename and not frame.filename.endswith("bench.py"):
                return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"
        return "?"

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if not self.is_meta:
                counts[f"{name}  {site()}"] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def bench_step(config: str, overrides: list[str], steps: int, warmup: int) -> dict[str, float]:
    """Time `steps` optimizer steps after `warmup` untimed ones -> the summary (also printed)."""
    import torch.distributed as dist

    from megarnn.config import load_config
    from megarnn.train.loop import build_model, padded_vocab, start_processes, train_step
    from megarnn.train.metrics import peak_flops

    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps {steps} --warmup {warmup}: expected --steps >= 1 and --warmup >= 0")
    cfg = load_config(config, overrides)
    if cfg.model.vocab_size == 0:  # what the trainer would take from a tokenizer of data.vocab_size
        cfg.model.vocab_size = padded_vocab(cfg.data.vocab_size)
    rank, world, mesh, device = start_processes(cfg)
    t = cfg.train
    model, _, engine, n_params, flops_per_token = build_model(cfg, mesh, device)
    batches = RandomBatches(cfg.model.vocab_size, cfg.data.seq_len, t.micro_batch_size, mesh.rank_in("dp"))
    tokens_per_step = t.micro_batch_size * t.grad_accum * mesh.dp * cfg.data.seq_len
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"{cfg.model.family} {n_params / 1e6:.2f}M parameters, layout {mesh.sizes()}, {world} process(es) on "
        f"{device.type}; {tokens_per_step} tokens per step")
    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = train_step(engine, batches, step, t.grad_accum, mesh, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if step >= warmup:
            times.append(seconds)
            say(f"step {step - warmup + 1}: {seconds:.4f} s, loss {float(loss):.4f}")
    seconds = statistics.median(times)
    tps = tokens_per_step / seconds
    out = {"seconds_per_step": seconds, "tokens_per_sec": tps,
           "mfu": flops_per_token * tps / (peak_flops(t.peak_tflops) * world),
           "peak_memory_gib": peak_memory_gib(device)}
    say(f"median {seconds:.4f} s/step  {tps:,.0f} tokens/s  MFU {out['mfu']:.2%}  "
        f"peak memory (rank 0) {out['peak_memory_gib']:.2f} GiB")
    with count_host_syncs() as syncs:  # one more step, untimed: where it reads values on the host
        train_step(engine, batches, warmup + steps, t.grad_accum, mesh, device)
    out["host_syncs"] = sum(syncs.values())
    say(f"host syncs in one step (rank 0): {out['host_syncs']}")
    for where, n in syncs.most_common():
        say(f"  {n:4d}  {where}")
    if dist.is_initialized():
        dist.barrier()
    return out


def bench_kernels(args: list[str]) -> int:
    script = Path(__file__).resolve().parents[1] / "tools" / "bench_kernels.py"
    if not script.is_file():
        raise ConfigError(f"{script} is missing: `megarnn bench kernels` runs tools/bench_kernels.py from a "
                          "checkout of megarnn; run it from one")
    old = sys.argv
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = old
    return 0
