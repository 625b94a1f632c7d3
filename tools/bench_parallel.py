"""Communication per training step for each parallel layout, and the step time of CPU runs.

    python tools/bench_parallel.py                 # tiny Griffin: bytes per step + measured CPU step time
    python tools/bench_parallel.py --paper         # 7B / 14B at realistic layouts on H100 nodes, on paper
    python tools/bench_parallel.py --tp-sp         # tp=2 bytes of one step, TP vs TP+SP: counted vs closed form
    TRITON_INTERPRET=1 python tools/bench_parallel.py --cp-launches   # Triton launches of a step, cp=1 vs cp=2

Bytes are per rank per optimizer step, counted from the model config (ring collectives move
2 (n-1)/n of the buffer for an all-reduce, (n-1)/n for an all-gather or reduce-scatter):
  dp  gradients: all-reduce of this rank's parameter shard, 2 (dp-1)/dp x params/(tp) x 4 bytes
      (fp32 gradients; ZeRO 1/2 do the same volume as reduce-scatter + all-gather)
  tp  megarnn/parallel/comm.py's closed form: per residual branch one all-reduce of (B, T/cp, D)
      forward and one backward (Griffin / ParaRNN: 2 branches per layer, Mamba2: 1) -- the same
      bytes as an all-gather + reduce-scatter each way under sequence parallelism -- plus the
      embedding's and the head's, the vocabulary-parallel loss and O(D) gradients
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
from megarnn.parallel.comm import tp_bytes_per_micro_batch  # noqa: E402

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
    tp = tp_bytes_per_micro_batch(c, B, seq_len, lay.tp, lay.cp, act_bytes=act_bytes)["total"] / lay.pp
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


def _count_step(rank: int, port: int, sp: bool, out: str) -> None:
    """One rank of a 2-rank tp step of the quickstart model: bytes sent, counted, to out.<rank>."""
    import torch
    import torch.distributed as dist

    from megarnn.models import RecurrentLM
    from megarnn.parallel.comm import CountBytes
    from megarnn.parallel.mesh import ParallelMesh
    from megarnn.parallel.plan import apply_sequence_parallel, apply_tensor_parallel
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    c = _quickstart_model()
    torch.manual_seed(0)
    model = RecurrentLM(c)
    apply_tensor_parallel(model, ParallelMesh.build(tp=2).group("tp"))
    if sp:
        apply_sequence_parallel(model, dist.group.WORLD)
    tokens = torch.randint(0, c.vocab_size, (16, 257))
    with CountBytes(2) as count:
        logits, _ = model(tokens[:, :-1])
        model.masked_loss(logits, tokens[:, 1:], torch.ones(16, 256, dtype=torch.bool)).backward()
    Path(f"{out}.{rank}").write_text(json.dumps(dict(count.bytes)))
    dist.destroy_process_group()


def _quickstart_model() -> ModelConfig:
    c = ModelConfig.from_yaml(ROOT / "configs/model/griffin-small.yaml")  # the quickstart's model
    c.vocab_size = 2048  # the quickstart's data.vocab_size
    return c


def tp_sp_table() -> None:
    import torch.multiprocessing as mp

    from megarnn.parallel.launch_env import free_port
    c = _quickstart_model()
    print(f"tp=2, quickstart model ({c.n_layers} layers '{c.block_pattern}', d_model {c.d_model}, vocab "
          f"{c.vocab_size}), one step of 16 x 256 tokens, fp32, bytes sent per rank (ring collectives)")
    print(f"{'':<8}{'counted':>12}{'closed form':>14}{'activations':>14}{'loss':>10}{'O(D) grads':>12}  collectives")
    with tempfile.TemporaryDirectory() as tmp:
        for sp in (False, True):
            mp.spawn(_count_step, args=(free_port(), sp, f"{tmp}/bytes"), nprocs=2, join=True)
            counted = json.loads(Path(f"{tmp}/bytes.0").read_text())
            want = tp_bytes_per_micro_batch(c.resolved(), 16, 256, 2, sequence_parallel=sp, act_bytes=4)
            kinds = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(counted.items()))
            print(f"{'TP+SP' if sp else 'TP':<8}{_fmt_bytes(sum(counted.values())):>12}{_fmt_bytes(want['total']):>14}"
                  f"{_fmt_bytes(want['activations']):>14}{_fmt_bytes(want['loss']):>10}{_fmt_bytes(want['params']):>12}"
                  f"  {kinds}")


def _launch_step(rank: int, port: int, name: str, cp: int, out: str) -> None:
    """One rank of a training step (forward + backward) of configs/model/NAME.yaml with
    scan_backend=triton, 2 x 64 tokens: Triton kernel launches, counted, to out.<rank>."""
    import torch
    import torch.distributed as dist
    from triton.runtime.interpreter import InterpretedFunction

    from megarnn.models import RecurrentLM
    from megarnn.parallel.plan import apply_context_parallel
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(cp))
    dist.init_process_group("gloo", rank=rank, world_size=cp)
    c = ModelConfig.from_yaml(ROOT / f"configs/model/{name}.yaml")
    c.vocab_size, c.scan_backend, c.n_layers = 512, "triton", len(c.block_pattern)
    torch.manual_seed(0)
    model = apply_context_parallel(RecurrentLM(c), dist.group.WORLD if cp > 1 else None)
    counts: dict[str, int] = {}
    run = InterpretedFunction.run

    def counting(self, *args, **kwargs):
        counts[self.fn.__name__] = counts.get(self.fn.__name__, 0) + 1
        return run(self, *args, **kwargs)
    InterpretedFunction.run = counting
    n = 64 // cp
    tokens = torch.randint(0, 512, (2, 65))[:, rank * n:(rank + 1) * n + 1]
    logits, _ = model(tokens[:, :-1])
    model.cross_entropy(logits, tokens[:, 1:]).sum().backward()
    Path(f"{out}.{rank}").write_text(json.dumps(counts))
    dist.destroy_process_group()


def cp_launch_table() -> None:
    import torch.multiprocessing as mp

    from megarnn.parallel.launch_env import free_port
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--cp-launches counts launches under Triton's interpreter: run it with TRITON_INTERPRET=1")
    print("Triton kernel launches per rank in one training step (forward + backward), model.scan_backend=triton,")
    print("one of each block of the pattern, 2 x 64 tokens, under TRITON_INTERPRET=1")
    print(f"{'model':<16}{'cp=1':>8}{'cp=2':>8}  kernels at cp=2")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("griffin-tiny", "mamba2-tiny", "paragru-tiny", "paralstm-tiny"):
            got = {}
            for cp in (1, 2):
                mp.spawn(_launch_step, args=(free_port(), name, cp, f"{tmp}/{name}{cp}"), nprocs=cp, join=True)
                got[cp] = json.loads(Path(f"{tmp}/{name}{cp}.0").read_text())
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(got[2].items()))
            print(f"{name:<16}{sum(got[1].values()):>8}{sum(got[2].values()):>8}  {kinds or '-'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--paper", action="store_true", help="only the on-paper GPU table")
    p.add_argument("--tp-sp", action="store_true", help="only tp=2 bytes of one step, TP vs TP+SP, counted and closed form")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--global-tokens", type=int, default=2**21, help="tokens per optimizer step (on paper)")
    p.add_argument("--cp-launches", action="store_true", help="only Triton launches per step, cp=1 vs cp=2 "
                   "(needs TRITON_INTERPRET=1)")
    args = p.parse_args()
    if args.cp_launches:
        return cp_launch_table()
    if args.tp_sp:
        return tp_sp_table()
    if not args.paper:
        cpu_table(args.steps)
        print()
    paper_table(args.mfu, args.global_tokens)


if __name__ == "__main__":
    main()
