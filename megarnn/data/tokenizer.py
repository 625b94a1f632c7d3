"""SentencePiece tokenizers: train one, load one, and hash it so data can be matched to it.

Trained tokenizers round-trip text exactly: no normalisation (identity rule), no added
or removed whitespace, byte fallback for unseen characters, and "\\n" as a piece of its
own (SentencePiece trains on lines, so newlines would otherwise cost a byte token each).
Ids: 0 <unk>, 1 <s> (bos, starts every document), 2 </s> (eos), 3 <pad>.

    tok = build_tokenizer(["corpus/*.jsonl", "hf:json:more/*.jsonl"], "tok/", vocab_size=8192)
    tok = build_tokenizer(["existing.model"], "tok/")       # an existing SentencePiece model, copied in
    enc = tok.encode_documents(["first doc", "second"])      # [bos] + ids + [eos] per document, flat

A tokenizer directory holds tokenizer.model; its sha256 is stamped into every shard, run
directory, checkpoint and export so data and models can be matched to it.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from megarnn.errors import DataError
from megarnn.files import atomic_write

MODEL_FILE = "tokenizer.model"
MODEL_TYPES = ("bpe", "unigram")


@dataclass
class EncodedDocs:
    """Documents framed as [bos] + ids + [eos], back to back.

    tokens (sum(lengths),) in the requested dtype; lengths, n_chars, n_bytes (n_docs,) int64:
    tokens, characters and UTF-8 bytes of each document.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    n_chars: np.ndarray
    n_bytes: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    def docs(self) -> list[np.ndarray]:
        """The documents as views into tokens."""
        ends = np.cumsum(self.lengths)
        return [self.tokens[e - n:e] for e, n in zip(ends, self.lengths)]


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

    def __reduce__(self):  # to a loader's worker processes: the model bytes, loaded again there
        return (Tokenizer, (self.model_bytes,))

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
        # several ranks may save the same tokenizer at once: each writes a temporary of its own
        atomic_write(Path(directory) / MODEL_FILE, self.model_bytes, unique=True)

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

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """Each text -> its ids as an int32 array (SentencePiece's batch API, num_threads C++ threads)."""
        try:
            return self.sp.Encode(texts, out_type="numpy", num_threads=num_threads)
        except (ValueError, RuntimeError, TypeError):  # older sentencepiece has no numpy output
            return [np.asarray(ids, np.int32) for ids in self.sp.Encode(texts, num_threads=num_threads)]

    def encode_documents(self, texts: list[str], dtype=np.int32, num_threads: int = 1) -> EncodedDocs:
        """texts -> EncodedDocs: each document framed by bos and eos, so every document starts a sequence."""
        ids = self.encode_batch(texts, num_threads)
        lengths = np.fromiter((len(i) + 2 for i in ids), np.int64, len(ids))
        ends = np.cumsum(lengths)
        tokens = np.empty(int(ends[-1]) if len(ends) else 0, dtype)
        body = np.ones(len(tokens), bool)  # vectorised framing: no per-document numpy calls
        body[ends - lengths] = body[ends - 1] = False
        tokens[ends - lengths] = self.bos_id
        tokens[ends - 1] = self.eos_id
        if len(ids):
            tokens[body] = np.concatenate(ids)
        n_chars = np.fromiter((len(t) for t in texts), np.int64, len(texts))
        n_bytes = np.fromiter((len(t.encode("utf-8")) for t in texts), np.int64, len(texts))
        return EncodedDocs(tokens, lengths, n_chars, n_bytes)


def train_tokenizer(documents: Iterable[str], vocab_size: int, model_type: str = "bpe",
                    max_lines: int = 2_000_000) -> Tokenizer:
    """Train on the lines of `documents` (at most max_lines); returns the tokenizer in memory.

    model_type: "bpe" or "unigram"; byte fallback and the special tokens unk/bos/eos/pad = 0/1/2/3.
    """
    if model_type not in MODEL_TYPES:
        raise DataError(f"tokenizer model type {model_type!r}; expected one of {MODEL_TYPES}")
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


def import_tokenizer(model_path: str | os.PathLike, output_dir: str | os.PathLike) -> Tokenizer:
    """Copy an existing SentencePiece .model into output_dir (as tokenizer.model) after checking it.

    The model must define bos and eos: every document is framed by them.
    """
    tok = Tokenizer.load(model_path)
    missing = [name for name, i in (("bos", tok.bos_id), ("eos", tok.eos_id)) if i < 0]
    if missing:
        raise DataError(f"{model_path}: the SentencePiece model has no {' / '.join(missing)} token (id -1); "
                        "megarnn frames every document with them: retrain with bos_id/eos_id set, "
                        "or train one with `megarnn tokenizer`")
    tok.save(output_dir)
    return tok


def build_tokenizer(inputs: list[str], output_dir: str | os.PathLike, vocab_size: int = 0,
                    model_type: str = "bpe", text_key: str = "text") -> Tokenizer:
    """`megarnn tokenizer`: train on inputs (files, globs, pkg:, hf:) or, when the one input is a
    .model file, import it; the tokenizer is saved to output_dir/tokenizer.model."""
    if len(inputs) == 1 and inputs[0].endswith(".model"):
        return import_tokenizer(inputs[0], output_dir)
    from megarnn.data.corpus import iter_documents

    if vocab_size <= 0:
        raise DataError(f"vocab size {vocab_size}: give the number of pieces to train (e.g. --vocab-size 8192), "
                        "or pass one existing .model file")
    tok = train_tokenizer(iter_documents(inputs, text_key), vocab_size, model_type)
    tok.save(output_dir)
    return tok
