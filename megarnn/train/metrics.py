"""Where numbers go: TensorBoard scalars, `log.txt` in the run directory, and a progress bar.

Tags: train/loss, train/lr, train/grad_norm, train/tokens_per_sec, train/mfu, train/tokens
(step x tokens per step at the run's batch size), val/loss, val/bpc (and anything else logged). `metrics.jsonl` keeps every scalar at full precision
(one JSON object per line: {"step", "tag", "value"}) for scripts and exact comparisons.
Only rank 0 writes.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s of known accelerators, for MFU when train.peak_tflops is 0.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
CPU_PEAK_TFLOPS = 1.0


def peak_flops(configured_tflops: float) -> float:
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return CPU_PEAK_TFLOPS * 1e12


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: str):
        self.enabled = enabled
        self.writer = self.bar = self.log = self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.log = open(run_dir / "log.txt", "a", buffering=1)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        show = progress == "on" or (progress == "auto" and sys.stderr.isatty())
        if show:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def text(self, line: str) -> None:
        """A line for the terminal and log.txt."""
        if not self.enabled:
            return
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
        self.log.write(stamped + "\n")
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def scalars(self, step: int, values: dict[str, float], echo: bool = True) -> None:
        if not self.enabled:
            return
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
            self.jsonl.write(json.dumps({"step": step, "tag": tag, "value": v}) + "\n")
        line = f"step {step} " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        if echo:
            self.text(line)
        else:
            self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def advance(self, step: int, loss: float | None = None) -> None:
        """Move the bar to `step`; `loss` (the mean of the last log interval) when there is one."""
        if self.bar is not None:
            self.bar.n = step
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.refresh()

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_bar()
        if self.writer is not None:
            self.writer.close()
        for f in (self.log, self.jsonl):
            if f is not None:
                f.close()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
