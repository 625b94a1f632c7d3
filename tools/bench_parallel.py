"""Communication per training step for each parallel layout, and the step time of CPU runs.

    python tools/bench_parallel.py                 # tiny Griffin: bytes per step + measured CPU step time
    python tools/bench_parallel.py --paper         # 7B / 14B at realistic layouts on H100 nodes, on paper

Bytes are per rank per optimizer step, counted from the model config (ring collectives move
2 (n-1)/n of the buffer for an all-reduce, (n-1)/n for an all-gather or reduce-scatter):
  dp  gradients: all-reduce of this rank's parameter shard, 2 (dp-1)/dp x params/(tp) x 4 bytes
      (fp32 gradients; ZeRO 1/2 do the same volume as reduce-scatter + all-gather)
  tp  activations: per residual branch one all-reduce of (B, T/cp, D) forward and one backward
      (Griffin / ParaRNN: 2 branches per layer, Mamba2: 1), plus the embedding's all-reduce
  cp  per layer O(B x D): the scan carries (all-gather of decay and state) and the conv /
      attention halos, forward and backward; independent of T
  pp  per micro batch the activation (B, T/cp, D) to the next stage and its gradient back,
      each 1/tp of it per rank (DeepSpeed partitions it over the tp group); tp and cp bytes
      count this stage's layers only (1/pp of them), and the 1F1B schedule idles a fraction
      (pp - 1) / (micro batches + pp - 1) of the step (the bubble)
The "on paper" table divides those bytes by NVLink (intra-node) or InfiniBand (inter-node)
bandwidth and compares with the step's compute time at a given MFU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megarnn.config import ModelConfig  # noqa: E402

NVLINK_GBS = 450.0  # H100 NVLink 4, per direction per GPU
IB_GBS = 50.0  # 400 Gb/s InfiniBand NIC per GPU
H100_BF16_TFLOPS = 989.0


@dataclass
class Layout:
    dp: int
    tp: int
    cp: int
    pp: int = 1

    def name(self) -> str:
        return f"dp{self.dp} tp{self.tp} cp{self.cp}" + (f" pp{self.pp}" if self.pp > 1 else "")


def _counts(c: ModelConfig) -> tuple[int, int]:
    """(parameters, temporal branches per layer summed over layers) of a model config."""
    import torch

    from megarnn.models import RecurrentLM
    with torch.device("meta"):
        m = RecurrentLM(c)
    branches = sum(1 if k == "M" else 2 for k in c.block_types())
    return m.num_params(), branches


def bytes_per_step(c: ModelConfig, lay: Layout, micro_batch: int, seq_len: int, act_bytes: int = 2) -> dict:
    c = c.resolved()
    params, branches = _counts(c)
    B, Tl, D = micro_batch, seq_len // lay.cp, c.d_model
    ring = lambda n: 2 * (n - 1) / n if n > 1 else 0.0  # noqa: E731
    dp = ring(lay.dp * lay.cp) * params / (lay.tp * lay.pp) * 4
    tp = ring(lay.tp) * 2 * (branches / lay.pp + 1) * B * Tl * D * act_bytes
    pp = 2 * B * Tl * D * act_bytes / lay.tp if lay.pp > 1 else 0.0
    cp = 0.0
    if lay.cp > 1:
        gather = (lay.cp - 1) / lay.cp
        for kind in c.block_types():
            if kind == "M":
                H = c.expand * c.d_model // c.ssm_head_dim
                carry = B * H * (1 + c.ssm_head_dim * c.d_state) * 4 * lay.cp
                halo = (c.conv_width - 1) * B * (c.expand * c.d_model + 2 * c.n_groups * c.d_state) * act_bytes
            elif kind == "A":
                carry = 0
                halo = (c.attention_window - 1) * B * 2 * c.n_kv_heads * c.head_dim * act_bytes
            else:
                carry = 2 * B * c.lru_width * 4 * lay.cp / lay.tp
                halo = (c.conv_width - 1) * B * c.lru_width * act_bytes / lay.tp
            cp += 2 * (carry * gather + halo) / lay.pp  # forward and backward, this stage's layers
    return {"dp": dp, "tp": tp, "cp": cp, "pp": pp, "total": dp + tp + cp + pp, "params": params}


def measure_cpu(lay: Layout, steps: int) -> float:
    """Seconds per step of a tiny Griffin under launch/torchrun.sh with this layout (gloo, CPU)."""
    world = lay.dp * lay.tp * lay.cp * lay.pp
    with tempfile.TemporaryDirectory() as tmp:
        args = ["configs/quickstart.yaml", "model=configs/model/griffin-tiny.yaml", "data.seq_len=64",
                "data.vocab_size=512", f"train.micro_batch_size={8 // lay.dp}", f"train.max_steps={steps}",
                "train.log_interval=1", "train.eval_interval=100000", "train.save_interval=100000",
                "train.progress=off", "train.sample_tokens=0", f"train.out_dir={tmp}/run",
                f"parallel.tp={lay.tp}", f"parallel.cp={lay.cp}", f"parallel.pp={lay.pp}",
                "data.holdout=[macbeth_gut.txt]"]
        cmd = [str(ROOT / "launch" / "torchrun.sh"), str(world), *args] if world > 1 else \
            [sys.executable, "-m", "megarnn", "train", *args]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True,
                       env={**os.environ, "MEGARNN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
        rows = [json.loads(x) for x in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
        tps = [r["value"] for r in rows if r["tag"] == "train/tokens_per_sec" and r["step"] > 1]
        return 8 * 64 / (sum(tps) / len(tps))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def cpu_table(steps: int) -> None:
    c = ModelConfig.from_yaml(ROOT / "configs/model/griffin-tiny.yaml")
    c.vocab_size = 512
    print("tiny Griffin (griffin-tiny.yaml), global batch 8 x 64 tokens, fp32, gloo on this CPU")
    print(f"{'layout':<20}{'dp bytes':>12}{'tp bytes':>12}{'cp bytes':>12}{'pp bytes':>12}{'s / step':>10}")
    for lay in (Layout(1, 1, 1), Layout(2, 1, 1), Layout(1, 2, 1), Layout(1, 1, 2), Layout(1, 1, 1, 2)):
        b = bytes_per_step(c, lay, 8 // lay.dp, 64, act_bytes=4)
        print(f"{lay.name():<20}{_fmt_bytes(b['dp']):>12}{_fmt_bytes(b['tp']):>12}{_fmt_bytes(b['cp']):>12}"
              f"{_fmt_bytes(b['pp']):>12}{measure_cpu(lay, steps):>10.3f}")


def paper_table(mfu: float, global_tokens: int) -> None:
    print(f"On paper: H100 nodes of 8 GPUs, NVLink {NVLINK_GBS:.0f} GB/s, InfiniBand {IB_GBS:.0f} GB/s per GPU, "
          f"bf16 {H100_BF16_TFLOPS:.0f} TFLOP/s at MFU {mfu:.0%}; a step of {global_tokens / 2**20:.0f}M tokens in "
          "micro batches of 1 x 4096 per replica; dp and pp over InfiniBand, tp and cp inside a node, nothing "
          "overlapped; compute includes the pipeline bubble")
    print(f"{'model':<14}{'layout':<22}{'compute s':>10}{'dp (IB) s':>11}{'tp (NVL) s':>11}{'cp (NVL) s':>11}"
          f"{'pp (IB) s':>11}{'comm/compute':>14}")
    cases = [("griffin-7b", Layout(8, 4, 1)), ("griffin-7b", Layout(16, 2, 1)), ("griffin-7b", Layout(4, 4, 2)),
             ("griffin-7b", Layout(4, 4, 1, 2)), ("griffin-14b", Layout(8, 8, 1)), ("griffin-14b", Layout(4, 8, 2)),
             ("griffin-14b", Layout(4, 8, 1, 2)), ("mamba2-2.7b", Layout(32, 1, 1)),
             ("paragru-7b", Layout(8, 4, 1))]
    for name, lay in cases:
        c = ModelConfig.from_yaml(ROOT / f"configs/model/{name}.yaml")
        b = bytes_per_step(c, lay, 1, 4096)
        micro_batches = global_tokens // 4096 // lay.dp  # per replica per step
        import torch

        from megarnn.models import RecurrentLM
        with torch.device("meta"):
            flops = RecurrentLM(c).flops_per_token(4096) * 4096 * micro_batches / (lay.tp * lay.cp * lay.pp)
        bubble = (lay.pp - 1) / (micro_batches + lay.pp - 1)
        compute = flops / (H100_BF16_TFLOPS * 1e12 * mfu) / (1 - bubble)
        t_dp = b["dp"] / (IB_GBS * 1e9)  # once per step
        t_tp = micro_batches * b["tp"] / (NVLINK_GBS * 1e9)
        t_cp = micro_batches * b["cp"] / (NVLINK_GBS * 1e9)
        t_pp = micro_batches * b["pp"] / (IB_GBS * 1e9)
        print(f"{name:<14}{lay.name():<22}{compute:>10.3f}{t_dp:>11.3f}{t_tp:>11.3f}{t_cp:>11.4f}{t_pp:>11.3f}"
              f"{(t_dp + t_tp + t_cp + t_pp) / compute:>14.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paper", action="store_true", help="only the on-paper GPU table")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--global-tokens", type=int, default=2**21, help="tokens per optimizer step (on paper)")
    args = p.parse_args()
    if not args.paper:
        cpu_table(args.steps)
        print()
    paper_table(args.mfu, args.global_tokens)


if __name__ == "__main__":
    main()
