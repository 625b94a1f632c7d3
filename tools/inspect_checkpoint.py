"""List what a checkpoint holds: step, model, the layout it was written with, its files, and
(with --tensors) every parameter of the merged full model with its shape and norm.

    python tools/inspect_checkpoint.py RUN_DIR|CHECKPOINTS_DIR|STEP_DIR [--tensors] [--verify]

--verify checks every file against the sha256 manifest in megarnn.json (slow on big
checkpoints). Errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megarnn.errors import MegarnnError  # noqa: E402
from megarnn.train.checkpoint import read_meta, resolve_checkpoint, verify  # noqa: E402


def file_kind(name: str) -> str:
    if name.startswith("layer_"):
        return "pipeline layer weights (per layer x tp rank)"
    if "optim_states" in name:
        return "ZeRO optimizer partition (per dp x cp rank; under ZeRO-3 also the weights)"
    if "model_states" in name:
        return "model states (per pp x tp rank): client state, LR schedule; weights unless pipelined or ZeRO-3"
    if name.startswith("tokenizer/"):
        return "tokenizer"
    return "run config" if name == "config.yaml" else ""


def describe(path: Path, tensors: bool, check: bool) -> str:
    ckpt_dir, tag = resolve_checkpoint(path, fallback=False)
    d = ckpt_dir / tag
    meta = read_meta(ckpt_dir, tag)
    if check:
        verify(d, meta)
    m, layout = meta["model"], meta.get("layout", {})
    lines = [f"checkpoint  {d}", f"step        {meta['step']}",
             f"model       {m['family']} d_model={m['d_model']} n_layers={m['n_layers']} pattern={m['block_pattern']} "
             f"vocab={m['vocab_size']}",
             "layout      " + " x ".join(f"{k}={layout[k]}" for k in ("pp", "dp", "cp", "tp") if k in layout)
             + f", ZeRO-{layout.get('zero_stage', '?')}",
             f"tp-split    {len(meta.get('tp_split', {}))} parameters cut by tensor parallelism",
             "files" + (" (verified)" if check else "")]
    files = meta.get("files", {})
    for rel, info in files.items():
        lines.append(f"  {info['size']:>12,d}  {rel}  {file_kind(rel)}")
    lines.append(f"  {sum(f['size'] for f in files.values()):>12,d}  in all")
    if tensors:
        from megarnn.train.ds_checkpoint import read_weights
        sd = read_weights(ckpt_dir, tag)
        lines.append(f"parameters  {sum(v.numel() for v in sd.values()):,d} (merged full model)")
        for name, v in sd.items():
            lines.append(f"  {name:<56} {str(tuple(v.shape)):<16} norm {v.float().norm().item():.4g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--tensors", action="store_true", help="list every parameter of the merged model")
    ap.add_argument("--verify", action="store_true", help="check every file against its sha256")
    args = ap.parse_args(argv)
    try:
        print(describe(args.path, args.tensors, args.verify))
    except MegarnnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
