"""`megarnn preprocess`: documents (jsonl / parquet / text / hf:) -> a directory of token shards.

    preprocess(["corpus/*.jsonl", "hf:json:more/*.jsonl"], "tok/", "shards/", workers=8)
    datasets = open_shards("shards/", tokenizer)          # -> list[IndexedDataset], checked

Output directory layout:
  shard-00000.bin / .idx   documents [k * docs_per_shard, (k + 1) * docs_per_shard) in input order,
                           each stored as [bos] + ids + [eos] (format: megarnn/data/indexed.py); the
                           header also records shard_index, first_doc, docs_per_shard, text_key and
                           sources_sha256 (paths, sizes and mtimes of the inputs)
  tokenizer/tokenizer.model  a copy of the tokenizer, so the directory stands on its own
  manifest.json            written last: the shards in order with their sizes and checksums. A
                           directory without it is unfinished and `open_shards` refuses it.

Work is split three ways: the main process finds documents and cuts them into raw batches
(corpus.iter_raw_batches: lines are not even parsed), `workers` processes parse and tokenize
them, and the main process writes the results in input order (at most 4 batches per worker in
flight, so memory stays bounded). Each shard is written to a temporary name and renamed, so an
interrupted run leaves complete shards plus at most a temporary file; running the same command
again keeps the complete shards that match (same inputs, tokenizer, text key and
docs_per_shard, checksums valid), skips their documents without tokenizing them, and goes on.
"""
from __future__ import annotations

import collections
import json
import multiprocessing as mp
import os
import re
from pathlib import Path
from typing import Callable, Iterator

from megarnn.data.corpus import RawBatch, decode_batch, fingerprint, iter_raw_batches, open_hf, resolve_sources
from megarnn.data.indexed import FORMAT_VERSION, IndexedDataset, ShardWriter, token_dtype, write_atomic
from megarnn.data.tokenizer import EncodedDocs, Tokenizer
from megarnn.errors import DataError

MANIFEST = "manifest.json"
DOCS_PER_SHARD = 100_000
SHARD_RE = re.compile(r"^\.?shard-(\d+)\.(bin|idx)(\.tmp)?$")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def preprocess(inputs: list[str], tokenizer_dir: str | os.PathLike, output_dir: str | os.PathLike,
               workers: int = 1, text_key: str = "text", docs_per_shard: int = DOCS_PER_SHARD,
               batch_docs: int = 2048, batch_bytes: int = 1 << 20,
               log: Callable[[str], None] | None = None) -> dict:
    """Tokenize every document of `inputs` into shards under output_dir; returns the manifest.

    inputs: paths, globs, pkg: or hf: sources (megarnn/data/corpus.py). Nothing is written before
    the inputs and the tokenizer are found. If output_dir already holds a finished run of the
    same command, it is returned as it is. A task sent to a worker is batch_docs documents
    (parquet, hf:), about batch_bytes of JSON lines, or one text file. Workers are started with `spawn`, so a script
    that calls this with workers > 1 needs the usual `if __name__ == "__main__":` guard.
    """
    if workers < 1 or docs_per_shard < 1:
        raise DataError(f"workers={workers}, docs_per_shard={docs_per_shard}: both must be >= 1")
    sources = resolve_sources(inputs)
    for s in sources:
        if s.kind == "hf":
            open_hf(s)  # a dataset missing from the cache fails here, before anything is written
    tok = Tokenizer.load(tokenizer_dir)
    out = Path(output_dir)
    settings = {"tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size, "text_key": text_key,
                "docs_per_shard": docs_per_shard, "sources_sha256": fingerprint(sources)}
    done = _finished_manifest(out, settings)
    if done is not None:
        _say(log, f"{out}: already complete ({done['n_docs']} documents, {done['n_tokens']} tokens)")
        return done
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the shard set is about to change
    _remove_temporaries(out)
    tok.save(out / "tokenizer")
    headers = _finished_prefix(out, settings)
    skip = sum(h["n_docs"] for h in headers)
    if headers:
        _say(log, f"{out}: resuming after {len(headers)} finished shard(s) ({skip} documents)")
    batches = iter_raw_batches(sources, text_key, skip_docs=skip, batch_docs=batch_docs, batch_bytes=batch_bytes)
    encoded = encode_in_order(batches, tok, workers, text_key)
    try:
        headers += _write_shards(encoded, out, tok, settings, len(headers), skip, log)
    finally:
        encoded.close()  # stops the worker pool at once if writing failed
    if not headers or sum(h["n_docs"] for h in headers) == 0:
        raise DataError(f"inputs {inputs}: no documents found; check the files and the text key {text_key!r}")
    manifest = _manifest(headers, settings, inputs)
    _remove_stale_shards(out, len(headers))
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    _say(log, f"{out}: {manifest['n_docs']} documents, {manifest['n_tokens']} tokens in {len(headers)} shard(s)")
    return manifest


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a finished shard directory. Raises DataError if there is none or it is damaged."""
    d = Path(directory)
    path = d / MANIFEST
    if not path.is_file():
        if not d.is_dir():
            raise DataError(f"shard directory {str(d)!r} not found; pass the --output of `megarnn preprocess`")
        if any(d.glob("shard-*.idx")):
            raise DataError(f"{d}: no {MANIFEST}, so `megarnn preprocess` did not finish there; run the same "
                            "command again to resume it")
        raise DataError(f"{d}: no {MANIFEST}; not a directory made by `megarnn preprocess`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); re-run `megarnn preprocess`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list) \
            or "tokenizer_sha256" not in manifest:
        raise DataError(f"{path}: not a megarnn manifest (no shards / tokenizer_sha256); re-run `megarnn preprocess`")
    return manifest


def open_shards(directory: str | os.PathLike, tokenizer: Tokenizer | None = None,
                verify: bool = True) -> list[IndexedDataset]:
    """A finished shard directory -> its shards in order, each checked against the manifest.

    With a tokenizer, the shards must have been made by it. verify=False skips the sha256 of
    the token data (sizes are still checked), for very large corpora.
    """
    manifest = read_manifest(directory)
    datasets = []
    for entry in manifest["shards"]:
        ds = IndexedDataset(Path(directory) / entry["name"], verify=verify)
        made = (ds.header["bin_sha256"], ds.header["tokenizer_sha256"])
        if made != (entry["bin_sha256"], manifest["tokenizer_sha256"]):
            raise DataError(f"{ds.prefix}.idx: does not match {Path(directory) / MANIFEST} (a shard from another "
                            "run was copied in?); re-run `megarnn preprocess` into a fresh directory")
        if tokenizer is not None:
            ds.check_tokenizer(tokenizer.sha256, tokenizer.vocab_size)
        datasets.append(ds)
    return datasets


def encode_in_order(batches: Iterator[RawBatch], tokenizer: Tokenizer, workers: int,
                    text_key: str = "text") -> Iterator[EncodedDocs]:
    """Decode and tokenize raw batches in `workers` processes; results come back in input order.

    At most 4 * workers batches are in flight: the reader never runs far ahead of the writer.
    workers=1 works in this process (no pickling, the baseline for throughput).
    """
    dtype = token_dtype(tokenizer.vocab_size)
    if workers == 1:
        for b in batches:
            yield tokenizer.encode_documents(decode_batch(b, text_key), dtype)
        return
    # spawn, not fork: the parent may hold threads (datasets, torch) that fork would copy half-way
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer.model_bytes, text_key))
    try:
        pending: collections.deque = collections.deque()
        for b in batches:
            pending.append(pool.apply_async(_encode_raw, (b,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


_WORKER: dict = {}


def _init_worker(model_bytes: bytes, text_key: str) -> None:
    _WORKER["tok"], _WORKER["text_key"] = Tokenizer(model_bytes), text_key


def _encode_raw(batch: RawBatch) -> EncodedDocs:
    tok = _WORKER["tok"]
    return tok.encode_documents(decode_batch(batch, _WORKER["text_key"]), token_dtype(tok.vocab_size))


def _write_shards(encoded: Iterator[EncodedDocs], out: Path, tok: Tokenizer, settings: dict,
                  first_shard: int, first_doc: int, log) -> list[dict]:
    """Cut the encoded stream into shards of docs_per_shard documents; returns their headers."""
    per = settings["docs_per_shard"]
    headers: list[dict] = []
    writer = None
    try:
        for enc in encoded:
            i = 0
            while i < len(enc):
                if writer is None:
                    index = first_shard + len(headers)
                    extra = {**settings, "shard_index": index, "first_doc": first_doc}
                    writer = ShardWriter(out / shard_name(index), tok.vocab_size, tok.sha256, extra)
                take = min(per - writer.n_docs, len(enc) - i)
                lo, hi = int(enc.lengths[:i].sum()), int(enc.lengths[:i + take].sum())
                writer.add(enc.tokens[lo:hi], enc.lengths[i:i + take], enc.n_chars[i:i + take],
                           enc.n_bytes[i:i + take])
                i += take
                if writer.n_docs == per:
                    headers.append(writer.finish())
                    first_doc += per
                    _say(log, f"{writer.prefix.name}: {per} documents, {headers[-1]['n_tokens']} tokens")
                    writer = None
        if writer is not None:
            headers.append(writer.finish())
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    return headers


def _finished_prefix(out: Path, settings: dict) -> list[dict]:
    """Headers of the leading shards that a run with these settings already finished (full shards only)."""
    headers: list[dict] = []
    first_doc = 0
    while True:
        prefix = out / shard_name(len(headers))
        if not Path(f"{prefix}.idx").is_file():
            return headers
        try:
            h = IndexedDataset(prefix).header
        except DataError:
            return headers
        same = all(h.get(k) == v for k, v in settings.items())
        if not same or h.get("shard_index") != len(headers) or h.get("first_doc") != first_doc \
                or h["n_docs"] != settings["docs_per_shard"]:
            return headers  # a short last shard is redone: the input might have grown since
        headers.append(h)
        first_doc += h["n_docs"]


def _finished_manifest(out: Path, settings: dict) -> dict | None:
    """The manifest if out holds a finished run with these settings whose shards all verify."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = read_manifest(out)
        if any(manifest.get(k) != v for k, v in settings.items()):
            return None
        open_shards(out)
    except DataError:
        return None
    return manifest


def _manifest(headers: list[dict], settings: dict, inputs: list[str]) -> dict:
    shards = [{"name": shard_name(h["shard_index"]), "n_docs": h["n_docs"], "n_tokens": h["n_tokens"],
               "first_doc": h["first_doc"], "bin_sha256": h["bin_sha256"], "index_sha256": h["index_sha256"]}
              for h in headers]
    return {"format_version": FORMAT_VERSION, "dtype": headers[0]["dtype"], **settings, "inputs": list(inputs),
            "n_docs": sum(h["n_docs"] for h in headers), "n_tokens": sum(h["n_tokens"] for h in headers),
            "shards": shards}


def _remove_temporaries(out: Path) -> None:
    for p in out.iterdir():
        m = SHARD_RE.match(p.name)
        if m and m.group(3):
            p.unlink(missing_ok=True)


def _remove_stale_shards(out: Path, n_shards: int) -> None:
    """Shards numbered past this run's last (left by an earlier run on more input) would confuse readers."""
    for p in out.iterdir():
        m = SHARD_RE.match(p.name)
        if m and (m.group(3) or int(m.group(1)) >= n_shards):
            p.unlink(missing_ok=True)


def _say(log, text: str) -> None:
    if log is not None:
        log(text)
