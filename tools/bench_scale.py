"""Checkpoint save and resume cost per rank as the number of ranks grows (gloo ranks on CPU).

    python tools/bench_scale.py [--ranks 1 2 4 8] [--d-model 256] [--layers 6] [--old]

For each number of ranks N: N processes (torch.multiprocessing, gloo, one thread each) build
the same model (dp only, ZeRO-1), save a checkpoint with megarnn.train.checkpoint.save, then
resume it with checkpoint.load (the same layout: verification, then DeepSpeed's load). Each
rank reports seconds and the bytes it read and wrote through the file system (rchar / wchar
of /proc/self/io, before and after: hashing and torch.load reads count, page-cache hits too).
The table gives the slowest rank's seconds and the largest / mean bytes per rank: flat as N
grows means the work is split; "of it hashing" is what checkpoint.verify read (the rest of a
resume's reads are DeepSpeed's load, which reads the model-states file on every dp rank). rank 0 writes DeepSpeed's model-states file (the whole weights
under dp), so its write share is the largest.

--old times the previous scheme for comparison: rank 0 hashes every file of the checkpoint
at save time, and every rank hashes every file before loading.

    python tools/bench_scale.py --layout 2,2 --reshard-to 1,4 [--ranks 4]

Model-parallel layouts (tp,pp; the trainer's own build_model: local construction, pipeline
engine): each rank saves and resumes as above and reports, beside its reads, the bytes of its
own files (what DeepSpeed loads on it: its model-states file, ZeRO slice and stage's layer
files). --reshard-to then starts the ranks again in another layout that loads the checkpoint
through megarnn/train/reshard.py (memory-mapped source files: only the slices a rank takes are
paged in, which rchar does not see), and reports the rank's reads and the growth of its peak
resident memory during the load beside its own new state.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def proc_io() -> dict[str, int]:
    """rchar / wchar of this process (Linux /proc/self/io); zeros elsewhere."""
    try:
        lines = Path("/proc/self/io").read_text().split("\n")
    except OSError:
        return {"rchar": 0, "wchar": 0}
    vals = dict(line.split(": ") for line in lines if ": " in line)
    return {k: int(vals.get(k, 0)) for k in ("rchar", "wchar")}


class _Tokenizer:
    """What checkpoint.save needs of a tokenizer: save(directory)."""

    def save(self, d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        (d / "tokenizer.model").write_bytes(b"x" * 1024)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(key + ":")).split()[1]) * 1024


def _layout_main(rank: int, world: int, port: int, args, out_dir: str, layout: tuple[int, int], phase: str) -> None:
    """Save then resume (phase "save"), or load the saved checkpoint in this layout ("reshard")."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)

    from megarnn.config import load_config
    from megarnn.train import checkpoint
    from megarnn.train.loop import build_model, start_processes

    tp, pp = layout
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", "model.vocab_size=2048",
        "parallel.zero_stage=1", f"parallel.tp={tp}", f"parallel.pp={pp}", "train.micro_batch_size=1"])
    _, _, mesh, device = start_processes(cfg)
    model, _, engine, _, _ = build_model(cfg, mesh, device)
    ckpt_dir = Path(out_dir) / "checkpoints"
    params = sum(p.numel() for p in engine.module.parameters())
    result = {"rank": rank, "params": params}
    if phase == "save":
        dist.barrier()
        io0, t0 = proc_io(), time.perf_counter()
        tag = checkpoint.save(engine, cfg, ckpt_dir, 1, {"param_groups": engine.megarnn_param_groups},
                              _Tokenizer(), mesh.sizes(), model)
        result.update(save_s=time.perf_counter() - t0, save_written=proc_io()["wchar"] - io0["wchar"])
        dist.barrier()
        checkpoint._VERIFIED.clear()
    tag = (ckpt_dir / "latest").read_text().strip()
    meta = checkpoint.read_meta(ckpt_dir, tag)
    if phase == "save":
        own = checkpoint.read_share(engine, meta, True)
        files = meta["files"]
        result["own_bytes"] = sum(files[r]["size"] for r in (own if own is not None else files))
    dist.barrier()
    hwm0 = _status("VmHWM")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak from here
    except OSError:
        pass
    rss0, io2, t2 = _status("VmRSS"), proc_io(), time.perf_counter()
    checkpoint.load(engine, cfg, ckpt_dir / tag, mesh.dp * mesh.cp)
    result.update(resume_s=time.perf_counter() - t2, resume_read=proc_io()["rchar"] - io2["rchar"],
                  peak_growth=max(_status("VmHWM") - rss0, 0), hwm_before=hwm0,
                  checkpoint_bytes=sum(f["size"] for f in meta["files"].values()),
                  checkpoint_params=meta.get("params", 0))
    (Path(out_dir) / f"{phase}{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_layouts(world: int, args) -> None:
    import torch.multiprocessing as mp

    from megarnn.parallel.launch_env import free_port
    mb = 1e6
    layout = tuple(int(x) for x in args.layout.split(","))
    with tempfile.TemporaryDirectory(dir=args.tmp) as out:
        mp.spawn(_layout_main, args=(world, free_port(), args, out, layout, "save"), nprocs=world, join=True)
        rs = [json.loads((Path(out) / f"save{r}.json").read_text()) for r in range(world)]
        total = rs[0]["checkpoint_bytes"]
        print(f"tp={layout[0]} pp={layout[1]} on {world} ranks: checkpoint {total / mb:.1f} MB")
        print(f"{'rank':>4} {'params':>9} {'own files MB':>12} | {'save s':>6} {'written MB':>10} | {'resume s':>8} "
              f"{'read MB':>8} {'read / own':>10}")
        for r in rs:
            print(f"{r['rank']:>4} {r['params']:>9} {r['own_bytes'] / mb:>12.1f} | {r['save_s']:>6.2f} "
                  f"{r['save_written'] / mb:>10.1f} | {r['resume_s']:>8.2f} {r['resume_read'] / mb:>8.1f} "
                  f"{r['resume_read'] / r['own_bytes']:>10.2f}")
        if args.reshard_to:
            to = tuple(int(x) for x in args.reshard_to.split(","))
            mp.spawn(_layout_main, args=(world, free_port(), args, out, to, "reshard"), nprocs=world, join=True)
            rs = [json.loads((Path(out) / f"reshard{r}.json").read_text()) for r in range(world)]
            per_param = total / sum(r["params"] for r in rs) * 1  # checkpoint bytes per parameter of the new layout
            print(f"reshard to tp={to[0]} pp={to[1]} (bytes of the rank's new state: its parameters x "
                  f"{per_param:.1f} B, the checkpoint's bytes per parameter)")
            print(f"{'rank':>4} {'params':>9} {'state MB':>9} | {'load s':>6} {'read MB':>8} {'peak growth MB':>14} "
                  f"{'growth / state':>14}")
            for r in rs:
                state = r["params"] * per_param
                print(f"{r['rank']:>4} {r['params']:>9} {state / mb:>9.1f} | {r['resume_s']:>6.2f} "
                      f"{r['resume_read'] / mb:>8.1f} {r['peak_growth'] / mb:>14.1f} {r['peak_growth'] / state:>14.2f}")


def _rank_main(rank: int, world: int, port: int, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)

    from megarnn.config import load_config
    from megarnn.models import RecurrentLM
    from megarnn.parallel.mesh import ParallelMesh
    from megarnn.train import checkpoint
    from megarnn.train.engine import build_engine, setup_distributed

    setup_distributed()
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", "model.vocab_size=2048",
        "parallel.zero_stage=1", "train.micro_batch_size=1", "train.keep_checkpoints=0"])
    mesh = ParallelMesh.build(1, 1, 1)
    torch.manual_seed(0)
    engine = build_engine(cfg, RecurrentLM(cfg.model), mesh)
    ckpt_dir = Path(out_dir) / "checkpoints"
    if args.old:  # the previous scheme: rank 0 hashes everything after the save
        real = checkpoint.hash_files

        def hash_files(d, rels, fsync=False):
            if rels and "config.yaml" in rels:  # rank 0's call for what no rank recorded: do all
                return real(d, checkpoint._listing(d), fsync)
            return {}
        checkpoint.hash_files = hash_files

    dist.barrier()
    io0, t0 = proc_io(), time.perf_counter()
    tag = checkpoint.save(engine, cfg, ckpt_dir, 1, {"param_groups": engine.megarnn_param_groups},
                          _Tokenizer(), mesh.sizes())
    save_s, io1 = time.perf_counter() - t0, proc_io()
    dist.barrier()
    if args.old:
        checkpoint.hash_files = real
    checkpoint._VERIFIED.clear()
    verify_read, real_verify = [0], checkpoint.verify

    def verify(*a, **k):  # the checksum reads alone, apart from DeepSpeed's load
        before = proc_io()["rchar"]
        try:
            return real_verify(*a, **k)
        finally:
            verify_read[0] += proc_io()["rchar"] - before
    checkpoint.verify = verify
    io2, t2 = proc_io(), time.perf_counter()
    if args.old:  # every rank hashed every file
        checkpoint.verify(ckpt_dir / tag, checkpoint.read_meta(ckpt_dir, tag))
    checkpoint.load(engine, cfg, ckpt_dir / tag, mesh.dp)
    resume_s, io3 = time.perf_counter() - t2, proc_io()
    meta = checkpoint.read_meta(ckpt_dir, tag)
    result = {"rank": rank, "save_s": save_s, "resume_s": resume_s,
              "save_read": io1["rchar"] - io0["rchar"], "save_written": io1["wchar"] - io0["wchar"],
              "resume_read": io3["rchar"] - io2["rchar"], "resume_written": io3["wchar"] - io2["wchar"],
              "verify_read": verify_read[0],
              "checkpoint_bytes": sum(f["size"] for f in meta["files"].values()),
              "params": sum(p.numel() for p in engine.module.parameters())}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, args) -> list[dict]:
    import torch.multiprocessing as mp

    from megarnn.parallel.launch_env import free_port
    with tempfile.TemporaryDirectory(dir=args.tmp) as out:
        mp.spawn(_rank_main, args=(world, free_port(), args, out), nprocs=world, join=True)
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--old", action="store_true", help="the previous scheme: rank 0 / every rank hashes all")
    ap.add_argument("--tmp", default=None, help="where to write the checkpoints (default: the system's)")
    ap.add_argument("--layout", default=None, help="tp,pp: a model-parallel layout instead of dp only")
    ap.add_argument("--reshard-to", default=None, help="tp,pp: then load the checkpoint in this layout")
    args = ap.parse_args(argv)
    if args.layout:
        for world in args.ranks:
            run_layouts(world, args)
        return 0
    mb = 1e6
    print(f"{'ranks':>5} {'ckpt MB':>8} | {'save s':>6} {'read MB max/mean':>17} {'written MB max/mean':>20} | "
          f"{'resume s':>8} {'read MB max/mean':>17} {'of it hashing':>14}")
    for world in args.ranks:
        rs = run(world, args)
        col = lambda k: (max(r[k] for r in rs) / mb, sum(r[k] for r in rs) / len(rs) / mb)  # noqa: E731
        print(f"{world:>5} {rs[0]['checkpoint_bytes'] / mb:>8.1f} | {max(r['save_s'] for r in rs):>6.2f} "
              f"{'%.1f / %.1f' % col('save_read'):>17} {'%.1f / %.1f' % col('save_written'):>20} | "
              f"{max(r['resume_s'] for r in rs):>8.2f} {'%.1f / %.1f' % col('resume_read'):>17} "
              f"{'%.1f / %.1f' % col('verify_read'):>14}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
