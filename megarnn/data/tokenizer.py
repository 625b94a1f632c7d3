"""SentencePiece tokenizers: train one, load one, and hash it so data can be matched to it.

Trained tokenizers round-trip text exactly: no normalisation (identity rule), no added
or removed whitespace, byte fallback for unseen characters, and "\\n" as a piece of its
own (SentencePiece trains on lines, so newlines would otherwise cost a byte token each).
Ids: 0 <unk>, 1 <s> (bos, starts every document), 2 </s> (eos), 3 <pad>.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from megarnn.errors import DataError

MODEL_FILE = "tokenizer.model"


class Tokenizer:
    def __init__(self, model_bytes: bytes, source: str = "<memory>"):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_bytes)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
            raise DataError(f"{source}: not a SentencePiece model ({e}); pass a tokenizer "
                            "directory or .model file made by `megarnn tokenizer`") from None
        self.model_bytes = model_bytes
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """path: a directory holding tokenizer.model, or a .model file."""
        p = Path(path)
        if p.is_dir():
            p = p / MODEL_FILE
        if not p.is_file():
            raise DataError(f"tokenizer {str(path)!r} not found; pass a directory with {MODEL_FILE} "
                            "or a .model file (train one with `megarnn tokenizer`)")
        return cls(p.read_bytes(), str(p))

    def save(self, directory: str | os.PathLike) -> None:
        _atomic_write(Path(directory) / MODEL_FILE, self.model_bytes)

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


def train_tokenizer(documents: Iterable[str], vocab_size: int, model_type: str = "bpe",
                    max_lines: int = 2_000_000) -> Tokenizer:
    """Train on the lines of `documents` (at most max_lines); returns the tokenizer in memory."""
    def lines():
        n = 0
        for doc in documents:
            for line in doc.split("\n"):
                if line.strip():
                    yield line
                    n += 1
                    if n >= max_lines:
                        return
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, user_defined_symbols=["\n"], split_digits=True,
            allow_whitespace_only_pieces=True, max_sentence_length=1 << 16,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=os.cpu_count() or 1,
            minloglevel=2, hard_vocab_limit=False)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {e}. A smaller data.vocab_size or more text may help") from None
    return Tokenizer(model.getvalue())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> None:
    """Copy a tokenizer directory's model into dst_dir (atomically)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src_dir / MODEL_FILE, dst_dir / f".{MODEL_FILE}.tmp")
    os.replace(dst_dir / f".{MODEL_FILE}.tmp", dst_dir / MODEL_FILE)
