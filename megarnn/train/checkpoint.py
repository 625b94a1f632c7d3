"""Checkpoints through DeepSpeed, plus what we need to resume exactly.

Layout (DeepSpeed's, under <out_dir>/checkpoints):
  latest                   the tag of the newest complete checkpoint (DeepSpeed writes it last)
  step_000100/             DeepSpeed's model / optimizer shards and our client state:
                           step, consumed samples, skipped steps, RNG states, config
  step_000100/megarnn.json what the checkpoint is (step, model config): read before loading
  step_000100/config.yaml  the resolved run config
  step_000100/tokenizer/   the tokenizer, so a checkpoint stands on its own
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from megarnn.config import Config
from megarnn.errors import CheckpointError

META_FILE = "megarnn.json"


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """A checkpoints dir (uses `latest`), a run dir, or one tag dir -> (checkpoints dir, tag)."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / META_FILE).is_file():
        return p.parent, p.name
    latest = p / "latest"
    if not latest.is_file():
        raise CheckpointError(f"no checkpoint in {str(path)!r}: expected a run directory, a checkpoints "
                              f"directory with a `latest` file, or a step_* directory with {META_FILE}")
    tag = latest.read_text().strip()
    if not (p / tag / META_FILE).is_file():
        raise CheckpointError(f"{p / tag}: checkpoint named by `latest` is incomplete or missing; "
                              "point train.resume at an earlier step_* directory")
    return p, tag


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    try:
        return json.loads((ckpt_dir / tag / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt_dir / tag / META_FILE}: unreadable ({e}); the checkpoint is damaged") from None


def check_compatible(meta: dict, cfg: Config, where: Path) -> None:
    """The saved model config must equal the run's; name the keys that differ."""
    saved, now = meta["model"], cfg.to_dict()["model"]
    diff = {k: (saved.get(k), now.get(k)) for k in now if saved.get(k) != now.get(k) and k != "scan_backend"}
    if diff:
        desc = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{where} was written by another model ({desc}); use a matching config, "
                              "a new train.out_dir, or train.resume=never")
    saved_tp = meta.get("parallel", {}).get("tp", 1)
    if saved_tp != cfg.parallel.tp:
        raise CheckpointError(f"{where} was written with parallel.tp={saved_tp} and this run has "
                              f"parallel.tp={cfg.parallel.tp}; resuming on another tensor-parallel layout is "
                              f"not supported yet: resume with parallel.tp={saved_tp}, or export the checkpoint "
                              "(megarnn export) and start from the export")


def save(engine, cfg: Config, ckpt_dir: Path, step: int, client: dict, tokenizer) -> str:
    tag = tag_for(step)
    client = {**client, "step": step, "rng": rng_state(), "config": cfg.to_dict()}
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    if engine.global_rank == 0:
        d = ckpt_dir / tag
        (d / "config.yaml").write_text(cfg.to_yaml())
        tokenizer.save(d / "tokenizer")
        # megarnn.json marks the checkpoint complete; `latest` moves only after it exists. It also
        # records how tensor parallelism cut each parameter, so the shards can be merged.
        splits = {n: list(p.tp_split) for n, p in engine.module.named_parameters() if hasattr(p, "tp_split")}
        meta = {"step": step, "model": cfg.to_dict()["model"], "parallel": cfg.to_dict()["parallel"],
                "tp_split": splits}
        (d / META_FILE).write_text(json.dumps(meta, indent=1))
        tmp = ckpt_dir / ".latest.tmp"
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / "latest")
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
    return tag


def load(engine, cfg: Config, path: str | Path) -> dict:
    """Load weights, optimizer, LR schedule and RNG into `engine`; returns our client state."""
    ckpt_dir, tag = resolve_checkpoint(path)
    meta = read_meta(ckpt_dir, tag)
    check_compatible(meta, cfg, ckpt_dir / tag)
    loaded, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}; the checkpoint is incomplete")
    set_rng_state(client["rng"])
    return client
