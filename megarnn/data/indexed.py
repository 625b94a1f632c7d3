"""Token shards: a memory-mapped `.bin` of token ids plus an `.idx` with document offsets.

Format (version 1), for a shard named PREFIX:
  PREFIX.bin   the documents' tokens back to back, dtype uint16 when the vocabulary
               fits (< 65536), else uint32; nothing else.
  PREFIX.idx   8 bytes magic b"MGRNIDX1", 4 bytes little-endian header length L, L bytes
               of UTF-8 JSON header, then three little-endian int64 arrays:
               offsets (n_docs + 1; document i is tokens[offsets[i]:offsets[i+1]]),
               n_chars (n_docs; characters of the source text) and n_bytes (n_docs; its
               UTF-8 bytes), used for bits per character / byte.
  The header holds format_version, dtype, vocab_size, tokenizer_sha256, n_docs,
  n_tokens, bin_sha256 (of the .bin) and index_sha256 (of the three arrays).

Both files are written under temporary names and renamed, the .bin first: a shard
whose .idx exists is complete. Opening checks sizes and (by default) both checksums.
A directory of shards made by `megarnn preprocess` is described in megarnn/data/preprocess.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from megarnn.errors import DataError
from megarnn.files import atomic_write, publish, temp_path

MAGIC = b"MGRNIDX1"
FORMAT_VERSION = 1
HEADER_KEYS = ("format_version", "dtype", "vocab_size", "tokenizer_sha256", "n_docs", "n_tokens",
               "bin_sha256", "index_sha256")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def write_shard(prefix: str | os.PathLike, docs: list[np.ndarray], n_chars: list[int], n_bytes: list[int],
                vocab_size: int, tokenizer_sha256: str, extra: dict | None = None) -> None:
    """Write documents (each a 1-D int array) as PREFIX.bin / PREFIX.idx, atomically."""
    with ShardWriter(prefix, vocab_size, tokenizer_sha256, extra) as w:
        for doc, c, b in zip(docs, n_chars, n_bytes):
            w.add(np.asarray(doc), [len(doc)], [c], [b])


class ShardWriter:
    """Write one shard document batch by document batch, without holding its tokens in memory.

        with ShardWriter(prefix, vocab_size, tokenizer_sha256, extra) as w:
            w.add(tokens, lengths, n_chars, n_bytes)   # any number of times
        # on leaving the block: .bin renamed into place, then .idx; on an exception: nothing left

    Tokens go to a temporary `.PREFIX.bin.tmp` as they come (their sha256 computed on the way);
    finish() writes the index and renames both, the .bin first, so a shard whose .idx exists
    is complete. abort() removes the temporary file.
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int, tokenizer_sha256: str, extra: dict | None = None):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.tokenizer_sha256, self.extra = vocab_size, tokenizer_sha256, extra or {}
        self.dtype = token_dtype(vocab_size)
        self.bin_path, self.idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        self.idx_path.unlink(missing_ok=True)  # an old .idx must never describe a new .bin
        self._tmp = temp_path(self.bin_path)  # `.PREFIX.bin.tmp`: preprocess removes stale ones by that name
        self._file = open(self._tmp, "wb")
        self._sha = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self._n_chars: list[np.ndarray] = []
        self._n_bytes: list[np.ndarray] = []
        self.n_docs = self.n_tokens = 0

    def add(self, tokens: np.ndarray, lengths, n_chars, n_bytes) -> None:
        """Append documents: tokens (sum(lengths),) back to back; lengths, n_chars, n_bytes (n,)."""
        lengths = np.asarray(lengths, np.int64)
        if int(lengths.sum()) != len(tokens) or not len(lengths) == len(n_chars) == len(n_bytes):
            raise ValueError(f"{len(tokens)} tokens for lengths summing to {int(lengths.sum())}, "
                             f"or {len(lengths)}/{len(n_chars)}/{len(n_bytes)} docs disagree")
        if len(tokens) and (int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0):
            raise ValueError(f"token ids outside [0, {self.vocab_size}) for shard {self.prefix}")
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._file.write(data)
        self._sha.update(data)
        self._lengths.append(lengths)
        self._n_chars.append(np.asarray(n_chars, np.int64))
        self._n_bytes.append(np.asarray(n_bytes, np.int64))
        self.n_docs += len(lengths)
        self.n_tokens += len(tokens)

    def finish(self) -> dict:
        """Write the .idx, rename both into place; returns the header."""
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
        arrays = offsets.tobytes() + cat(self._n_chars).tobytes() + cat(self._n_bytes).tobytes()
        header = {
            "format_version": FORMAT_VERSION, "dtype": self.dtype.name, "vocab_size": self.vocab_size,
            "tokenizer_sha256": self.tokenizer_sha256, "n_docs": self.n_docs, "n_tokens": self.n_tokens,
            "bin_sha256": self._sha.hexdigest(), "index_sha256": hashlib.sha256(arrays).hexdigest(), **self.extra,
        }
        head = json.dumps(header).encode()
        publish(self._tmp, self.bin_path)  # fsynced and renamed: the .bin is whole before the .idx exists
        atomic_write(self.idx_path, MAGIC + struct.pack("<I", len(head)) + head + arrays)
        return header

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


write_atomic = atomic_write  # megarnn/data/preprocess.py imports it by this name


class IndexedDataset:
    """One shard, memory-mapped: the tokens and the index arrays (offsets, n_chars, n_bytes are
    read-only views of the .idx file, so the ranks of a node share one copy in the page cache).
    ds[i] -> document i as a numpy array of token ids.

    verify: check both checksums now (reads both files whole); False checks sizes only (the
    caller may check the checksums later, see verify_checksums)."""

    def __init__(self, prefix: str | os.PathLike, verify: bool = True):
        self.prefix = Path(prefix)
        idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for p in (idx_path, bin_path):
            if not p.is_file():
                raise DataError(f"shard file {p} is missing; re-run `megarnn preprocess` for this data")
        with open(idx_path, "rb") as f:
            raw = f.read(12)
            hlen = struct.unpack("<I", raw[8:12])[0] if len(raw) == 12 else 0
            raw += f.read(hlen)
        if raw[:8] != MAGIC or len(raw) < 12:
            raise DataError(f"{idx_path}: not a megarnn index (bad magic); re-run `megarnn preprocess`")
        try:
            self.header = json.loads(raw[12:12 + hlen])
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{idx_path}: corrupt header; re-run `megarnn preprocess`") from None
        h = self.header
        if not isinstance(h, dict):
            raise DataError(f"{idx_path}: corrupt header; re-run `megarnn preprocess`")
        if h.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{idx_path}: format version {h.get('format_version')}, this megarnn reads "
                            f"{FORMAT_VERSION}; re-run `megarnn preprocess`")
        missing = [k for k in HEADER_KEYS if k not in h]
        if missing:
            raise DataError(f"{idx_path}: corrupt header (missing {missing}); re-run `megarnn preprocess`")
        n = h["n_docs"]
        n_arrays = idx_path.stat().st_size - 12 - hlen
        if not isinstance(n, int) or n < 0 or n_arrays != 8 * (3 * n + 1):
            raise DataError(f"{idx_path}: truncated index ({n_arrays} bytes of arrays, expected "
                            f"{8 * (3 * n + 1)}); re-run `megarnn preprocess`")
        a = np.memmap(idx_path, dtype="<i8", mode="r", offset=12 + hlen, shape=(3 * n + 1,))
        self._arrays, self._idx_path, self._bin_path = a, idx_path, bin_path
        self.offsets, self.n_chars, self.n_bytes = a[:n + 1], a[n + 1:2 * n + 1], a[2 * n + 1:]
        if h["dtype"] not in ("uint16", "uint32"):
            raise DataError(f"{idx_path}: corrupt header (token dtype {h['dtype']!r}); re-run `megarnn preprocess`")
        self.dtype = np.dtype(h["dtype"])
        expected = h["n_tokens"] * self.dtype.itemsize
        if bin_path.stat().st_size != expected:
            raise DataError(f"{bin_path}: {bin_path.stat().st_size} bytes, expected {expected} "
                            "(truncated or from another index); re-run `megarnn preprocess`")
        self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if expected else np.zeros(0, self.dtype)
        if verify:
            self.verify_checksums()

    def verify_checksums(self) -> None:
        """The sha256 of the index arrays and of the token data against the header; DataError
        naming the file otherwise. Reads both files whole, in blocks."""
        if _sha256(self._arrays) != self.header["index_sha256"]:
            raise DataError(f"{self._idx_path}: checksum mismatch (corrupt index); re-run `megarnn preprocess`")
        if _sha256(self.tokens) != self.header["bin_sha256"]:
            raise DataError(f"{self._bin_path}: checksum mismatch (corrupt token data); re-run `megarnn preprocess`")

    @property
    def nbytes(self) -> int:
        """The size of the shard's two files' contents (index arrays and tokens)."""
        return int(self._arrays.nbytes + self.tokens.nbytes)

    def __len__(self) -> int:
        return self.header["n_docs"]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def n_tokens(self) -> int:
        return self.header["n_tokens"]

    def check_tokenizer(self, tokenizer_sha256: str, vocab_size: int) -> None:
        if self.header["tokenizer_sha256"] != tokenizer_sha256:
            raise DataError(
                f"{self.prefix}: made with tokenizer {self.header['tokenizer_sha256'][:12]}, but the run uses "
                f"{tokenizer_sha256[:12]}; re-tokenize with this tokenizer or point data.tokenizer at the original")
        if self.header["vocab_size"] != vocab_size:
            raise DataError(f"{self.prefix}: vocab_size {self.header['vocab_size']} != tokenizer's {vocab_size}")


def _sha256(a: np.ndarray, block: int = 1 << 24) -> str:
    """sha256 of an array's bytes, 16 MiB at a time (a memory map is not read into memory whole)."""
    h, raw = hashlib.sha256(), a.reshape(-1).view(np.uint8) if a.size else np.zeros(0, np.uint8)
    for i in range(0, len(raw), block):
        h.update(raw[i:i + block])
    return h.hexdigest()


def verify_share(datasets: list[IndexedDataset], rank: int, world: int) -> int:
    """Check the checksums of this rank's share of `datasets` (the largest shard first to the
    least loaded rank: about 1 / world of the bytes each; every shard checked by exactly one of
    the `world` ranks). Returns the bytes hashed; DataError at the first bad shard."""
    load, done = [0] * world, 0
    for ds in sorted(datasets, key=lambda d: (-d.nbytes, str(d.prefix))):
        r = min(range(world), key=lambda i: (load[i], i))
        load[r] += ds.nbytes
        if r == rank:
            ds.verify_checksums()
            done += ds.nbytes
    return done
