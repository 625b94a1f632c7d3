"""Turn a run's `data:` config into a tokenizer and token shards inside the run directory.

    tokenizer, train, val = prepare_run_data(cfg.data, run_dir)

The tokenizer is `data.tokenizer` when given, else the one already in the run directory
(a resumed run), else trained on the training documents. Shards are rebuilt only when
the source files or the tokenizer changed. Validation documents are `data.val_files`
plus the training files named in `data.holdout` (whole files, so nothing leaks).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from megarnn.config import DataConfig
from megarnn.data.corpus import read_documents, resolve_files
from megarnn.data.indexed import IndexedDataset, write_shard
from megarnn.data.tokenizer import MODEL_FILE, Tokenizer, train_tokenizer
from megarnn.errors import DataError


def split_files(cfg: DataConfig) -> tuple[list[Path], list[Path]]:
    train = resolve_files(cfg.train_files)
    names = {f.name for f in train}
    missing = [h for h in cfg.holdout if h not in names]
    if missing:
        raise DataError(f"data.holdout names {missing}, which are not among data.train_files "
                        f"(e.g. {sorted(names)[:3]}); use file names as they appear there")
    val = [f for f in train if f.name in cfg.holdout] + (resolve_files(cfg.val_files) if cfg.val_files else [])
    train = [f for f in train if f.name not in cfg.holdout]
    if not train:
        raise DataError("every training file is held out (data.holdout); keep at least one for training")
    return train, val


def load_or_train_tokenizer(cfg: DataConfig, run_dir: Path, train_files: list[Path]) -> Tokenizer:
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    saved = run_dir / "tokenizer" / MODEL_FILE
    if saved.is_file():
        return Tokenizer.load(saved)
    docs = (d for f in train_files for d in read_documents(f, cfg.text_key))
    tok = train_tokenizer(docs, cfg.vocab_size, cfg.tokenizer_type)
    tok.save(run_dir / "tokenizer")
    return tok


def build_shard(files: list[Path], tokenizer: Tokenizer, prefix: Path, text_key: str) -> IndexedDataset:
    """Tokenize `files` into one shard at `prefix`, or reuse it if sources and tokenizer match."""
    fingerprint = _fingerprint(files)
    if Path(f"{prefix}.idx").is_file():
        try:
            ds = IndexedDataset(prefix)
            if (ds.header.get("sources_sha256") == fingerprint
                    and ds.header["tokenizer_sha256"] == tokenizer.sha256):
                return ds
        except DataError:
            pass  # stale or damaged: rebuild below
    docs, n_chars, n_bytes = [], [], []
    for f in files:
        for text in read_documents(f, text_key):
            ids = [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
            docs.append(np.asarray(ids, dtype=np.int64))
            n_chars.append(len(text))
            n_bytes.append(len(text.encode("utf-8")))
    write_shard(prefix, docs, n_chars, n_bytes, tokenizer.vocab_size, tokenizer.sha256,
                extra={"sources_sha256": fingerprint, "sources": [str(f) for f in files]})
    return IndexedDataset(prefix)


def prepare_run_data(cfg: DataConfig, run_dir: Path) -> tuple[Tokenizer, IndexedDataset, IndexedDataset | None]:
    train_files, val_files = split_files(cfg)
    tok = load_or_train_tokenizer(cfg, run_dir, train_files)
    train = build_shard(train_files, tok, run_dir / "data" / "train", cfg.text_key)
    val = build_shard(val_files, tok, run_dir / "data" / "val", cfg.text_key) if val_files else None
    return tok, train, val


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
