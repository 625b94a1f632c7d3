"""Checkpoints through DeepSpeed, plus what we need to resume exactly.

Layout (DeepSpeed's, under <out_dir>/checkpoints):
  latest                   the tag of the newest complete checkpoint (DeepSpeed writes it last)
  step_000100/             DeepSpeed's model / optimizer shards and our client state:
                           step, consumed samples, skipped steps, RNG states, config
  step_000100/megarnn.json what the checkpoint is (step, model and parallel config, how tensor
                           parallelism cut each parameter, every file with size and sha256):
                           written last, read and verified before loading
  step_000100/config.yaml  the resolved run config
  step_000100/tokenizer/   the tokenizer, so a checkpoint stands on its own

Work per rank stays flat as ranks grow. Saving: every rank hashes (and fsyncs) the files it
wrote itself, all at once; rank 0 gathers the {file: size, sha256} lists, hashes what no rank
recorded (config, tokenizer, DeepSpeed's recovery scripts), then publishes megarnn.json and
`latest`. Resuming: every rank checks that every file is there with its size (metadata only),
then hashes only the files it reads: its own shard files when the layout is the same, its part
of the source files (split by size over the ranks) for a reshard; the verdict is agreed over all
ranks, so they all load the same checkpoint. One process alone hashes everything, as does
tools/inspect_checkpoint.py --verify.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from megarnn.config import Config
from megarnn.errors import CheckpointError
from megarnn.files import atomic_write, fsync_path
from megarnn.train import reshard
from megarnn.train.ds_checkpoint import META_FILE, rank_files, read_meta, share_of, source_files  # noqa: F401

CRASH_ENV = "MEGARNN_TEST_CRASH_AT_SAVE"  # a step number: SIGKILL mid-save (tests of crash safety)


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


def resolve_checkpoint(path: str | Path, fallback: bool = True) -> tuple[Path, str]:
    """A run directory or its checkpoints directory -> (checkpoints dir, the tag `latest` names);
    one step_* directory -> (its parent, its name).

    fallback=True (train.resume): when `latest` is garbage or names a checkpoint that fails
    verification, the newest step_* directory that verifies instead, said on one line (see
    newest_good); nothing is deleted. fallback=False (megarnn.load, tools/inspect_checkpoint.py):
    `latest`'s checkpoint as it is, or CheckpointError when it is incomplete or missing."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / META_FILE).is_file():
        return p.parent, p.name
    if not (p / "latest").is_file():
        raise CheckpointError(f"no checkpoint in {str(path)!r}: expected a run directory, a checkpoints "
                              f"directory with a `latest` file, or a step_* directory with {META_FILE}")
    if fallback:
        return p, newest_good(p)
    tag, why = _latest_tag(p)
    if tag is None or not (p / tag / META_FILE).is_file():
        raise CheckpointError(f"{p / (tag or 'latest')}: " + (f"`latest` {why}" if tag is None else
                              "the checkpoint named by `latest` is incomplete or missing")
                              + "; point train.resume at an earlier step_* directory")
    return p, tag


def newest_good(ckpt_dir: Path) -> str:
    """The tag of the newest checkpoint in ckpt_dir that verifies: `latest`'s, else (`latest`
    unreadable or naming no directory, or its checkpoint missing megarnn.json or a file, or a
    file truncated or corrupt) the newest older step_* directory that does; then one line on
    stderr names it and what was skipped and why. Bad checkpoints stay on disk.
    CheckpointError when none verifies."""
    named, why = _latest_tag(ckpt_dir)
    skipped, candidates = ([] if named else [f"`latest` {why}"]), _candidates(ckpt_dir, named)
    alone = _launched_ranks() == 1
    for tag in candidates:
        try:
            # One process reads every shard: it hashes them all now. Several ranks check here that
            # every file is there, whole in size (the same answer on every rank); `load` then hashes
            # each rank's share and agrees on the verdict, walking back further if it must.
            verify(ckpt_dir / tag, read_meta(ckpt_dir, tag), files=None if alone else [])
            if not alone:
                _DEFERRED[(ckpt_dir.resolve(), tag)] = list(skipped)
        except CheckpointError as e:
            if candidates == [named]:
                raise  # the only checkpoint there is: its own error says it best
            skipped.append(f"{tag} ({str(e).split('; ')[0]})")
            continue
        if skipped:
            _say(f"warning: resuming from {ckpt_dir / tag}, the newest checkpoint that verifies; skipped "
                 + "; ".join(skipped) + " (left on disk)")
        return tag
    raise CheckpointError(f"no checkpoint in {ckpt_dir} verifies: " + "; ".join(skipped or ["no step_* directory"])
                          + "; start afresh with train.resume=never or a new train.out_dir")


def _latest_tag(ckpt_dir: Path) -> tuple[str | None, str]:
    """(the tag `latest` names, "") or (None, what is wrong with it)."""
    try:
        tag = (ckpt_dir / "latest").read_bytes().decode().strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"is unreadable ({e})"
    if not tag or "/" in tag or tag in (".", "..") or not (ckpt_dir / tag).is_dir():
        return None, f"names no checkpoint directory ({tag[:40]!r})"
    return tag, ""


def _candidates(ckpt_dir: Path, named: str | None) -> list[str]:
    """Tags to try, newest first: `named`, then the step_* directories older than it (all of them
    when `latest` named none; newer ones are saves that never completed)."""
    steps = sorted(((int(m.group(1)), d.name) for d in ckpt_dir.iterdir()
                    if d.is_dir() and (m := re.fullmatch(r"step_(\d+)", d.name))), reverse=True)
    if named is None:
        return [tag for _, tag in steps]
    m = re.fullmatch(r"step_(\d+)", named)
    return [named] + [tag for step, tag in steps if tag != named and (m is None or step < int(m.group(1)))]


_DEFERRED: dict[tuple[Path, str], list[str]] = {}  # (ckpt dir, tag) chosen without hashing -> what was skipped


def _launched_ranks() -> int:
    """The number of ranks of this launch (WORLD_SIZE; 1 without a launcher)."""
    import torch.distributed as dist
    if dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def _say(text: str) -> None:
    """One line on stderr, from rank 0 only (every rank resolves the checkpoint)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"megarnn: {text}", file=sys.stderr, flush=True)


def check_compatible(meta: dict, cfg: Config, where: Path) -> None:
    """The saved model config must equal the run's; name the keys that differ. (The parallel
    layout may differ: `load` reshards, see check_layout.)"""
    saved, now = meta["model"], cfg.to_dict()["model"]
    diff = {k: (saved.get(k), now.get(k)) for k in now if saved.get(k) != now.get(k) and k != "scan_backend"}
    if diff:
        desc = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{where} was written by another model ({desc}); use a matching config, "
                              "a new train.out_dir, or train.resume=never")


def check_layout(meta: dict, cfg: Config, replicas: int, where: Path) -> bool:
    """True when DeepSpeed reloads the checkpoint as it is: the same tp, pp and ZeRO stage and,
    under ZeRO (which partitions the optimizer state over the dp x cp ranks), as many dp x cp
    ranks; ZeRO-0 keeps whole states on every rank. False: `load` reshards it (reshard.py).
    ZeRO-3 partitions the weights too and is not resharded: a change raises CheckpointError.

    replicas: this run's data x context parallel ranks.
    """
    p = cfg.parallel
    saved = {"tp": 1, "pp": 1, "zero_stage": p.zero_stage, **meta.get("parallel", {}), **meta.get("layout", {})}
    was_ranks = saved["dp"] * saved.get("cp", 1) if "dp" in saved else replicas  # older checkpoints: unknown
    same = ((saved["tp"], saved["pp"], saved["zero_stage"]) == (p.tp, p.pp, p.zero_stage)
            and (p.zero_stage == 0 or was_ranks == replicas))
    if not same and 3 in (saved["zero_stage"], p.zero_stage):
        raise CheckpointError(
            f"{where} was written with parallel.tp={saved['tp']}, pp={saved['pp']}, zero_stage={saved['zero_stage']} "
            f"on {was_ranks} data x context parallel ranks and this run has parallel.tp={p.tp}, pp={p.pp}, "
            f"zero_stage={p.zero_stage} on {replicas}; ZeRO-3 partitions the weights themselves and cannot be "
            f"resharded: resume with parallel.tp={saved['tp']}, pp={saved['pp']}, zero_stage={saved['zero_stage']} "
            f"on {was_ranks} data x context parallel ranks, or train with parallel.zero_stage<=2, whose "
            "checkpoints resume on any layout")
    return same


def save(engine, cfg: Config, ckpt_dir: Path, step: int, client: dict, tokenizer, layout: dict, model=None) -> str:
    """Write checkpoint step_NNNNNN; publish it (megarnn.json, then `latest`) only when complete.

    Every rank hashes and fsyncs the files it wrote, in parallel with the others; rank 0 gathers
    the lists, adds its own files (config, tokenizer) and writes megarnn.json, then `latest`. A
    crash at any point leaves the previous checkpoint as `latest`.

    model: the RecurrentLM (default engine.module); its names are the ones megarnn.json records,
    also when the engine trains it as a pipeline."""
    tag = tag_for(step)
    d = ckpt_dir / tag
    rank = engine.global_rank
    if rank == 0 and (d / META_FILE).exists():
        (d / META_FILE).unlink()  # rewriting a step: it is incomplete until the new meta lands
    _barrier()  # no rank overwrites a shard of a step whose old megarnn.json still stands
    client = {**client, "step": step, "rng": rng_state(), "config": cfg.to_dict()}
    with _recording_writes(engine) as written:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    _barrier()  # every rank's shards are on disk
    if os.environ.get(CRASH_ENV) == str(step):  # fault injection for the crash tests
        os.kill(os.getpid(), signal.SIGKILL)
    mine = hash_files(d, _inside(d, written), fsync=True)  # this rank's share, on every rank at once
    if rank == 0:
        (d / "config.yaml").write_text(cfg.to_yaml())
        tokenizer.save(d / "tokenizer")
    parts = _gather(mine)
    if rank == 0:
        files = {rel: info for part in parts for rel, info in part.items()}
        rest = [rel for rel in _listing(d) if rel not in files]  # ours, and what DeepSpeed copied in
        files.update(hash_files(d, rest, fsync=True))
        for sub in sorted({(d / rel).parent for rel in files}, reverse=True):
            fsync_path(sub)  # the directory entries of the new files
        # megarnn.json marks the checkpoint complete and lists every file with its checksum; it
        # also records how tensor parallelism cut each parameter, so the shards can be merged.
        model = engine.module if model is None else model
        splits = {n: list(p.tp_split) for n, p in model.named_parameters() if hasattr(p, "tp_split")}
        meta = {"step": step, "model": cfg.to_dict()["model"], "parallel": cfg.to_dict()["parallel"],
                "layout": {**layout, "zero_stage": cfg.parallel.zero_stage}, "tp_split": splits,
                "files": dict(sorted(files.items()))}
        atomic_write(d / META_FILE, json.dumps(meta, indent=1))
        atomic_write(ckpt_dir / "latest", tag)  # `latest` moves last
        prune(ckpt_dir, cfg.train.keep_checkpoints, keep=tag)
    _barrier()
    return tag


class _recording_writes:
    """Within the block, the paths DeepSpeed's checkpoint engine saves on this rank (every
    torch.save of a checkpoint goes through engine.checkpoint_engine.save)."""

    def __init__(self, engine):
        self.engine, self.paths = engine, []

    def __enter__(self) -> list[str]:
        ce = getattr(self.engine, "checkpoint_engine", None)
        if ce is not None:
            inner = ce.save

            def save(*args, **kwargs):
                out = inner(*args, **kwargs)
                self.paths.append(str(kwargs["path"] if "path" in kwargs else args[1]))
                return out
            ce.save = save
        return self.paths

    def __exit__(self, *exc):
        ce = getattr(self.engine, "checkpoint_engine", None)
        if ce is not None and "save" in vars(ce):
            del ce.save
        return False


def _inside(d: Path, paths: list[str]) -> list[str]:
    """Paths under d, relative to it (others, if any, are not part of the checkpoint)."""
    root, out = Path(d).resolve(), []
    for p in paths:
        try:
            rel = str(Path(p).resolve().relative_to(root))
        except ValueError:
            continue
        if rel != META_FILE and rel not in out:
            out.append(rel)
    return out


def _listing(d: Path) -> list[str]:
    """Every file under d except megarnn.json, relative, sorted."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != META_FILE)


def _gather(obj) -> list:
    """Rank 0: every rank's obj, in rank order; other ranks: []."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def _agree(error: str | None) -> str | None:
    """The first rank's error (in rank order) on every rank, None when no rank has one."""
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, error)
    return next((e for e in out if e is not None), None)


def sha256_file(f: Path, fsync: bool = False) -> str:
    """sha256 of a file, read in 4 MiB blocks; fsync: also flush it to the disk (its writer)."""
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
        if fsync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def hash_files(d: Path, rels: list[str], fsync: bool = False) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of the given files under d."""
    return {rel: {"size": (d / rel).stat().st_size, "sha256": sha256_file(d / rel, fsync)} for rel in rels}


def file_manifest(d: Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under d except megarnn.json (one process
    hashing everything; `save` splits the work over the ranks that wrote the files)."""
    return hash_files(d, _listing(d))


def verify(d: Path, meta: dict, files: list[str] | None = None) -> None:
    """Every file of the manifest is there with its size, and `files` (relative paths; None:
    all of the manifest's) hash to their sha256; raises CheckpointError naming the first that
    does not. A file that verified in this process and has not changed since (same size and
    modification time) is not hashed again: resuming checks a checkpoint, then loads it."""
    manifest = meta.get("files", {})
    for rel, want in manifest.items():
        f = d / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint; resume from an earlier step_* directory")
        if f.stat().st_size != want["size"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, expected {want['size']} (truncated or "
                                  "overwritten); resume from an earlier step_* directory")
    for rel in manifest if files is None else files:
        if rel not in manifest:
            raise CheckpointError(f"{d / rel}: not in the checkpoint's {META_FILE}; the checkpoint is incomplete: "
                                  "resume from an earlier step_* directory")
        f, want = d / rel, manifest[rel]["sha256"]
        st = f.stat()
        key = (st.st_size, st.st_mtime_ns, want)
        if _VERIFIED.get(f.resolve()) == key:
            continue
        if sha256_file(f) != want:
            raise CheckpointError(f"{f}: checksum mismatch (corrupt file); resume from an earlier "
                                  "step_* directory")
        _VERIFIED[f.resolve()] = key


_VERIFIED: dict[Path, tuple] = {}  # file -> (size, mtime, sha256) when it last verified in this process


def prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    """Delete complete checkpoints older than the newest keep_last (0 keeps all)."""
    if keep_last <= 0:
        return
    done = sorted(p for p in ckpt_dir.glob("step_*") if (p / META_FILE).is_file())
    for old in done[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def load(engine, cfg: Config, path: str | Path, replicas: int) -> dict:
    """Load weights, optimizer, LR schedule and RNG into `engine`; returns our client state.

    replicas: this run's data x context parallel ranks (checked against the checkpoint's).
    DeepSpeed loads a checkpoint of the same layout itself; another layout (tp, dp x cp, ZeRO
    stage 0-2) is resharded (megarnn/train/reshard.py). Each rank first hashes the files it
    reads (see read_share) and all ranks agree: a checksum mismatch anywhere stops every rank or,
    when resolve_checkpoint picked the checkpoint without hashing it (several ranks), moves all
    of them to the next older checkpoint that verifies.
    """
    ckpt_dir, tag = resolve_checkpoint(path)
    deferred = _DEFERRED.pop((ckpt_dir.resolve(), tag), None)
    tags = [tag] + (_candidates(ckpt_dir, tag)[1:] if deferred is not None else [])
    skipped = list(deferred or [])
    for i, tag in enumerate(tags):
        d, error = ckpt_dir / tag, None
        try:
            meta = read_meta(ckpt_dir, tag)
            check_compatible(meta, cfg, d)
            same_layout = check_layout(meta, cfg, replicas, d)
            verify(d, meta, read_share(engine, meta, same_layout))
        except CheckpointError as e:
            error = str(e)
        error = _agree(error)
        if error is None:
            break
        if len(tags) == 1:
            raise CheckpointError(error)
        skipped.append(f"{tag} ({error.split('; ')[0]})")
        if i == len(tags) - 1:
            raise CheckpointError(f"no checkpoint in {ckpt_dir} verifies: " + "; ".join(skipped)
                                  + "; start afresh with train.resume=never or a new train.out_dir")
    if tag != tags[0]:
        _say(f"warning: resuming from {ckpt_dir / tag}, the newest checkpoint that verifies; skipped "
             + "; ".join(skipped) + " (left on disk)")
    if same_layout:
        loaded, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {ckpt_dir / tag}; the checkpoint is incomplete")
    else:
        client = reshard.load_full_state(engine, reshard.read_full_state(ckpt_dir, tag), engine.megarnn_mesh)
    set_rng_state(client["rng"])
    return {**client, "loaded_from": str(ckpt_dir / tag)}


def read_share(engine, meta: dict, same_layout: bool) -> list[str] | None:
    """The files this rank hashes before loading (relative paths; None: all of them).

    Same layout: the files DeepSpeed reads on this rank (its model states, its ZeRO optimizer
    slice, its pipeline stage's layer files); hashing them also brings them into the page cache
    for the load that follows. A reshard: every rank reads pieces of many source files, so the
    source files are split by size over the ranks and each hashes its part (the verdict is
    agreed, so together they vouch for every file read). One process: all of them."""
    import torch.distributed as dist
    world = dist.get_world_size() if dist.is_initialized() else 1
    mesh = getattr(engine, "megarnn_mesh", None)
    if world == 1 or mesh is None:
        return None
    if same_layout:
        module = engine.module
        stop = getattr(module, "_local_stop", None)
        layers = range(module._local_start, stop) if stop is not None else None
        return rank_files(meta, mesh.rank_in("pp"), mesh.rank_in("tp"),
                          mesh.rank_in("dp") * mesh.cp + mesh.rank_in("cp"), layers)
    return share_of(meta.get("files", {}), source_files(meta), dist.get_rank(), world)
