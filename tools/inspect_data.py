"""Look inside token shards: print one document as text, or counts and the header.

    python tools/inspect_data.py SHARD_DIR --decode N [--tokenizer DIR]
    python tools/inspect_data.py SHARD_DIR --stats

SHARD_DIR is the --output of `megarnn preprocess` (with manifest.json), a directory of
*.idx/*.bin shards (a run's data/), or one shard prefix. Documents are numbered across the
shards in order from 0. --decode writes document N exactly as it was in the source (no
newline added); the tokenizer defaults to SHARD_DIR/tokenizer and must be the one the shards
were made with. Errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megarnn.data.indexed import IndexedDataset  # noqa: E402
from megarnn.data.preprocess import MANIFEST, open_shards  # noqa: E402
from megarnn.data.tokenizer import Tokenizer  # noqa: E402
from megarnn.errors import DataError, MegarnnError  # noqa: E402

PER_SHARD = ("n_docs", "n_tokens", "bin_sha256", "index_sha256", "shard_index", "first_doc")


def open_any(path: Path, verify: bool) -> list[IndexedDataset]:
    """A preprocess output, a directory of shards, or one shard prefix -> its shards in order."""
    if (path / MANIFEST).is_file() or (path.is_dir() and any(path.glob("shard-*.idx"))):
        return open_shards(path, verify=verify)
    if path.is_dir():
        prefixes = sorted(p.with_suffix("") for p in path.glob("*.idx"))
        if not prefixes:
            raise DataError(f"{path}: no manifest.json and no *.idx shards; pass the --output of `megarnn preprocess`")
        return [IndexedDataset(p, verify=verify) for p in prefixes]
    return [IndexedDataset(path, verify=verify)]


def decode(datasets: list[IndexedDataset], n: int, tokenizer: Tokenizer) -> str:
    """Document n (counted across shards) -> its text, without the bos / eos that frame it."""
    total = sum(len(ds) for ds in datasets)
    if not 0 <= n < total:
        raise DataError(f"--decode {n}: there are {total} documents (0..{total - 1})")
    for ds in datasets:
        if n < len(ds):
            ds.check_tokenizer(tokenizer.sha256, tokenizer.vocab_size)
            doc = ds[n]
            lo = 1 if len(doc) and doc[0] == tokenizer.bos_id else 0
            hi = len(doc) - 1 if len(doc) > lo and doc[-1] == tokenizer.eos_id else len(doc)
            return tokenizer.decode(doc[lo:hi])
        n -= len(ds)
    raise AssertionError("unreachable")


def stats(datasets: list[IndexedDataset]) -> str:
    docs = sum(len(ds) for ds in datasets)
    tokens = sum(ds.n_tokens for ds in datasets)
    chars = sum(int(ds.n_chars.sum()) for ds in datasets)
    nbytes = sum(int(ds.n_bytes.sum()) for ds in datasets)
    lines = [f"shards     {len(datasets)}", f"documents  {docs}", f"tokens     {tokens}",
             f"characters {chars}", f"bytes      {nbytes}",
             f"tokens/doc {tokens / max(docs, 1):.1f}", f"chars/token {chars / max(tokens, 1):.3f}",
             "header     " + json.dumps({k: v for k, v in datasets[0].header.items() if k not in PER_SHARD})]
    lines += [f"  {ds.prefix.name}: {len(ds)} documents, {ds.n_tokens} tokens" for ds in datasets]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("shard_dir", type=Path)
    p.add_argument("--decode", type=int, metavar="N", help="print document N (from 0, across shards) as text")
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir or .model (default: SHARD_DIR/tokenizer)")
    p.add_argument("--stats", action="store_true", help="documents, tokens and the header")
    p.add_argument("--no-verify", action="store_true", help="skip the checksums (faster on large shards)")
    args = p.parse_args(argv)
    if args.decode is None and not args.stats:
        p.error("give --decode N and/or --stats")
    try:
        datasets = open_any(args.shard_dir, verify=not args.no_verify)
        if args.stats:
            print(stats(datasets))
        if args.decode is not None:
            tok_path = args.tokenizer or args.shard_dir / "tokenizer"
            if args.tokenizer is None and not tok_path.exists():
                raise DataError(f"{args.shard_dir}: no tokenizer/ inside; pass --tokenizer DIR")
            sys.stdout.write(decode(datasets, args.decode, Tokenizer.load(tok_path)))
            sys.stdout.flush()
    except MegarnnError as e:
        print(f"inspect_data: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
