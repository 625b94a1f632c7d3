"""Training batches: packing, blending by weight, held-out documents, and an order that resumes exactly.

Packing (PackedDataset). Every epoch shuffles one corpus's documents with a generator seeded by
(seed, epoch), lays them end to end and cuts the stream into samples of seq_len + 1 tokens
(stride seq_len); the samples are shuffled again by the same generator. Sample j of the corpus
is sample j % n of epoch j // n. Only index arrays are built (O(documents + samples) per epoch);
the tokens stay memory-mapped in their shards, and so do the document offsets (the .idx: one
copy in the page cache for all ranks of a node). What a rank holds per document: the epoch's
order (uint32 below 2^32 documents), its running token count (int64) and, with held-out
documents, the ids of the training ones (uint32); per sample, the sample order (uint32).

Blending (Blend). Corpora are mixed by weight with a fixed interleaving: the weights are scaled
to integers W_k (summing to P, about 65536), and every P consecutive global samples hold
exactly W_k samples of corpus k, spread evenly: the n-th sample of corpus k within a period
sits at fraction (n + 1/2) / W_k of it (Sainte-Lague / Webster order; Megatron's greedy
blending index approximates the same). Global sample g -> (corpus k, its sample j) is a pure
function of g, O(1), with no table to rebuild on resume.

Order. The global batch of step s is global samples [s * G, (s + 1) * G), G = micro batch x
grad accum x dp ranks, so it does not depend on the number of data-parallel ranks (rank r
takes its rows of it). A loader's position is `state_dict(step)` (consumed samples + the data
it was made from), saved in checkpoints; `load_state_dict` continues from there, also with a
different number of ranks or micro batch size.

Held-out documents (heldout_mask / validation_split). Document i of a corpus is held out
when a hash of i falls below `val_fraction`: the same split for every seed and run, no
leak into training, and usable on streams whose length is unknown.

Each batch carries `reset` (True where a document starts, so recurrent state resets)
and `loss_mask` (False where the target is the first token of the next document).
StreamingLoader reads documents from hf: (or any) sources and tokenizes them on the fly, for
corpora too large to preprocess; it has the same micro_batch / state_dict API.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from megarnn.data.corpus import decode_batch, iter_raw_batches, resolve_sources
from megarnn.data.indexed import IndexedDataset
from megarnn.data.tokenizer import EncodedDocs, Tokenizer
from megarnn.errors import DataError

BLEND_RESOLUTION = 1 << 16  # weights are integers out of about this many samples per period
_HOLDOUT_SALT = np.uint64(0x6D67726E6E766C21)  # fixed: the split must not move with the seed


def heldout_mask(doc_index: np.ndarray, val_fraction: float) -> np.ndarray:
    """(n,) document indices -> (n,) bool: True for documents held out for validation.

    splitmix64 of the index, compared with val_fraction * 2^64: a fixed pseudo-random split.
    """
    if val_fraction <= 0:
        return np.zeros(len(doc_index), dtype=bool)
    x = np.asarray(doc_index, dtype=np.uint64) ^ _HOLDOUT_SALT
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 < val_fraction


class DocumentSubset:
    """Some documents of a list of shards, read like one IndexedDataset (what `evaluate` takes).

    doc_ids index the documents of `datasets` laid end to end. ds[i] -> tokens of document
    doc_ids[i]; n_chars, n_bytes (len,) int64.
    """

    def __init__(self, datasets: list[IndexedDataset], doc_ids: np.ndarray):
        self.datasets = datasets
        which, local = _locate_docs(datasets, doc_ids)
        self._which, self._local = which, local
        self.n_chars = np.array([datasets[w].n_chars[i] for w, i in zip(which, local)], np.int64)
        self.n_bytes = np.array([datasets[w].n_bytes[i] for w, i in zip(which, local)], np.int64)
        self.n_tokens = int(sum(len(self[i]) for i in range(len(self))))

    def __len__(self) -> int:
        return len(self._which)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[self._which[i]][int(self._local[i])]


def validation_split(datasets: list[IndexedDataset], val_fraction: float) -> DocumentSubset:
    """The held-out documents of one corpus (see heldout_mask), for evaluate()."""
    n = sum(len(ds) for ds in datasets)
    return DocumentSubset(datasets, np.flatnonzero(heldout_mask(np.arange(n), val_fraction)))


def _locate_docs(datasets: list[IndexedDataset], doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global document ids -> (which dataset, index inside it)."""
    bounds = np.cumsum([0] + [len(ds) for ds in datasets])
    doc_ids = np.asarray(doc_ids, np.int64)
    which = np.searchsorted(bounds, doc_ids, side="right") - 1
    return which, doc_ids - bounds[which]


def _compact(a: np.ndarray, n: int) -> np.ndarray:
    """Indices below n as uint32 when n fits (half an int64 array), else int64."""
    return np.asarray(a).astype(np.uint32 if n < 2 ** 32 else np.int64, copy=False)


class PackedDataset:
    """One corpus (a list of shards) packed into samples of seq_len + 1 tokens, epoch after epoch.

    seed: an int or a tuple of ints; epoch e shuffles with np.random.default_rng([*seed, e]).
    doc_ids: the documents to use (global ids over the shards), default all of them.
    sample(j) -> (tokens (T + 1,) int64, starts (T + 1,) bool) for any j >= 0.
    """

    def __init__(self, datasets: list[IndexedDataset], seq_len: int, seed: int | tuple = 0,
                 doc_ids: np.ndarray | None = None):
        self.datasets, self.seq_len = datasets, seq_len
        self.seed = tuple(seed) if isinstance(seed, (tuple, list)) else (seed,)
        self._bounds = np.cumsum([0] + [len(ds) for ds in datasets]).astype(np.int64)
        n = int(self._bounds[-1])
        self._n_all = n
        self._doc_ids = None if doc_ids is None else _compact(doc_ids, n)  # None: all, in order
        self.n_docs = n if doc_ids is None else len(self._doc_ids)
        if doc_ids is None:
            self.n_tokens = int(sum(int(ds.offsets[-1]) - int(ds.offsets[0]) for ds in datasets))
        else:
            self.n_tokens = int(sum(self._spans(self._doc_ids[i:i + (1 << 20)])[2].sum()
                                    for i in range(0, self.n_docs, 1 << 20)))
        self.samples_per_epoch = max(self.n_tokens - 1, 0) // seq_len
        self._epoch, self._fingerprint = None, None

    def _spans(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global document ids -> (shard, first token in it, length), read from the shards' offsets."""
        ids = np.asarray(ids, np.int64)
        which = np.searchsorted(self._bounds, ids, side="right") - 1
        local = ids - self._bounds[which]
        start, length = np.empty(len(ids), np.int64), np.empty(len(ids), np.int64)
        for w, ds in enumerate(self.datasets):
            m = slice(None) if len(self.datasets) == 1 else which == w
            lo = local[m]
            start[m] = ds.offsets[lo]
            length[m] = ds.offsets[lo + 1] - start[m]
        return which, start, length

    def _doc(self, k: int) -> int:
        """The global id of the k-th document used (k < n_docs)."""
        return k if self._doc_ids is None else int(self._doc_ids[k])

    def _load_epoch(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        rng = np.random.default_rng([*self.seed, epoch])
        order = rng.permutation(self.n_docs)
        ids = order if self._doc_ids is None else self._doc_ids[order]
        self._cum = np.zeros(self.n_docs + 1, np.int64)
        np.cumsum(self._spans(ids)[2], out=self._cum[1:])
        self._order = _compact(order, self.n_docs)
        del order, ids
        self._sample_order = _compact(rng.permutation(self.samples_per_epoch), self.samples_per_epoch)
        self._epoch = epoch

    def sample(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample j -> (tokens (T + 1,) int64, starts (T + 1,) bool: True where a document begins)."""
        if self.samples_per_epoch < 1:
            raise DataError(f"{self.n_tokens} tokens make no sample of seq_len={self.seq_len}; add data")
        epoch, i = divmod(j, self.samples_per_epoch)
        self._load_epoch(epoch)
        begin = int(self._sample_order[i]) * self.seq_len
        end = begin + self.seq_len + 1
        tokens = np.empty(self.seq_len + 1, np.int64)
        starts = np.zeros(self.seq_len + 1, bool)
        k = int(np.searchsorted(self._cum, begin, side="right")) - 1
        pos = begin
        while pos < end:  # copy from each document the sample overlaps
            d = self._doc(int(self._order[k]))
            w = int(np.searchsorted(self._bounds, d, side="right")) - 1
            a, b = pos - self._cum[k], min(end, self._cum[k + 1]) - self._cum[k]
            first = int(self.datasets[w].offsets[d - self._bounds[w]])
            tokens[pos - begin:pos - begin + b - a] = self.datasets[w].tokens[first + a:first + b]
            starts[pos - begin] |= a == 0
            pos += b - a
            k += 1
        return tokens, starts

    def fingerprint(self) -> str:
        """What the samples are made of: shard checksums, the documents used, seq_len, seed."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps([self.seq_len, list(self.seed)]).encode())
            for ds in self.datasets:
                h.update(f"{ds.header['bin_sha256']}|{ds.header['index_sha256']}\n".encode())
            step = 1 << 20  # the ids as int64, as they were always hashed, a block at a time
            for i in range(0, self.n_docs, step):
                ids = np.arange(i, min(i + step, self.n_docs)) if self._doc_ids is None else self._doc_ids[i:i + step]
                h.update(np.asarray(ids, np.int64).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


class Blend:
    """Corpora mixed by weight (see the module docstring). sample(g) -> corpus sample (tokens, starts)."""

    def __init__(self, corpora: list[PackedDataset], weights: list[float]):
        if len(weights) != len(corpora) or not weights or any(not w > 0 for w in weights):
            raise DataError(f"blend weights {weights} for {len(corpora)} datasets: give one weight > 0 per dataset "
                            "(drop a dataset rather than giving it weight 0)")
        total = float(sum(weights))
        self.corpora = corpora
        self.counts = np.array([max(1, round(w / total * BLEND_RESOLUTION)) for w in weights], np.int64)
        self.period = int(self.counts.sum())
        source = np.repeat(np.arange(len(corpora)), self.counts)
        rank = np.concatenate([np.arange(c) for c in self.counts])
        key = (rank + 0.5) / self.counts[source]
        order = np.lexsort((source, key))  # by key, ties by corpus index
        self._source, self._rank = source[order], rank[order]
        for k, c in enumerate(corpora):
            if c.samples_per_epoch < 1:
                raise DataError(f"blended dataset {k} has {c.n_tokens} tokens: not one sample of "
                                f"seq_len={c.seq_len}; add data to it or remove it from the blend")

    def locate(self, g: int) -> tuple[int, int]:
        """Global sample g -> (corpus k, sample j of corpus k)."""
        q, p = divmod(g, self.period)
        k = int(self._source[p])
        return k, q * int(self.counts[k]) + int(self._rank[p])

    def sample(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        k, j = self.locate(g)
        return self.corpora[k].sample(j)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.counts.tobytes())
        for c in self.corpora:
            h.update(c.fingerprint().encode())
        return h.hexdigest()


class PackedLoader:
    """Micro batches of packed samples from one corpus, or from a blend of corpora.

    datasets: list[IndexedDataset] (one corpus); with `weights`, one list of IndexedDataset per
    blended corpus. val_fraction > 0 leaves out the held-out documents (validation_split gives
    them). The batches are a pure function of (data, seq_len, seed, step).
    """

    def __init__(self, datasets: list, seq_len: int, micro_batch_size: int,
                 grad_accum: int = 1, seed: int = 1234, dp_rank: int = 0, dp_size: int = 1,
                 weights: list[float] | None = None, val_fraction: float = 0.0):
        self.seq_len, self.mb, self.ga = seq_len, micro_batch_size, grad_accum
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.global_batch_size = micro_batch_size * grad_accum * dp_size
        if weights is None:
            self.samples = _corpus(datasets, seq_len, (seed,), val_fraction)
            total, self.samples_per_epoch = self.samples.n_tokens, self.samples.samples_per_epoch
            if self.samples_per_epoch < self.global_batch_size:
                raise DataError(
                    f"the training data has {total} tokens: {self.samples_per_epoch} samples of data.seq_len="
                    f"{seq_len}, fewer than one global batch ({self.global_batch_size}); add data or lower "
                    "data.seq_len / train.micro_batch_size")
        else:
            corpora = [_corpus(ds, seq_len, (seed, k + 1), val_fraction) for k, ds in enumerate(datasets)]
            self.samples = Blend(corpora, weights)
        self._base_step, self._base_sample = 0, 0

    def first_sample(self, step: int) -> int:
        """The global index of the first sample of optimizer step `step`."""
        return self._base_sample + (step - self._base_step) * self.global_batch_size

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This rank's micro batch `micro` of optimizer step `step` (0-based).

        Returns tokens, targets: (mb, T) int64; reset, loss_mask: (mb, T) bool.
        """
        first = self.first_sample(step) + (micro * self.dp_size + self.dp_rank) * self.mb
        return make_batch([self.samples.sample(first + j) for j in range(self.mb)])

    def state_dict(self, step: int) -> dict:
        """The position before step `step` (after step - 1), to save in a checkpoint. The same on every rank."""
        return {"kind": "packed", "step": step, "consumed_samples": self.first_sample(step),
                "data": self.samples.fingerprint()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from a saved position: step state["step"] starts at global sample consumed_samples.

        strict: the data, seq_len, seed and weights must be those of the saved run (else DataError).
        """
        _check_state(state, "packed", self.samples.fingerprint(), strict)
        self._base_step, self._base_sample = int(state["step"]), int(state["consumed_samples"])


def _corpus(datasets: list[IndexedDataset], seq_len: int, seed: tuple, val_fraction: float) -> PackedDataset:
    if not isinstance(datasets, (list, tuple)) or not all(isinstance(d, IndexedDataset) for d in datasets):
        raise DataError("PackedLoader takes a list of IndexedDataset per corpus (a list of such lists with weights)")
    n = sum(len(ds) for ds in datasets)
    doc_ids = np.flatnonzero(~heldout_mask(np.arange(n), val_fraction)) if val_fraction > 0 else None
    return PackedDataset(list(datasets), seq_len, seed, doc_ids)


def _check_state(state: dict, kind: str, data: str, strict: bool) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind or "consumed_samples" not in state:
        raise DataError(f"data position {str(state)[:120]!r} is not a {kind} loader's state; resume with the "
                        "same kind of data (shards vs streaming) the checkpoint was made with")
    if strict and state.get("data") != data:
        raise DataError("the checkpoint's data position was made with other data, seq_len, seed or blend "
                        f"weights ({str(state.get('data'))[:12]} vs now {data[:12]}); resuming would not continue the "
                        "same sample order: use the run's data settings, or load with strict=False to accept it")


def make_batch(samples: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """[(tokens (T + 1,), starts (T + 1,))] * B -> tokens, targets (B, T) int64; reset, loss_mask (B, T) bool."""
    toks = np.stack([t for t, _ in samples]).astype(np.int64)
    starts = np.stack([s for _, s in samples])
    return {
        "tokens": torch.from_numpy(toks[:, :-1].copy()),
        "targets": torch.from_numpy(toks[:, 1:].copy()),
        "reset": torch.from_numpy(starts[:, :-1].copy()),
        "loss_mask": torch.from_numpy(~starts[:, 1:]),
    }


class TokenizedDocuments:
    """Documents tokenized in memory, read like one IndexedDataset (what `evaluate` takes).

    ds[i] -> tokens of document i ([bos] + ids + [eos], int32); n_chars, n_bytes (len,) int64.
    """

    def __init__(self, enc: EncodedDocs):
        self._docs, self.n_chars, self.n_bytes = enc.docs(), enc.n_chars, enc.n_bytes
        self.n_tokens = len(enc.tokens)

    def __len__(self) -> int:
        return len(self._docs)

    def __getitem__(self, i: int) -> np.ndarray:
        return self._docs[i]


def read_validation(inputs: list[str], tokenizer: Tokenizer, text_key: str = "text", val_fraction: float = 0.0,
                    max_docs: int = 1000) -> TokenizedDocuments:
    """Up to max_docs validation documents of a stream, tokenized: the held-out documents of inputs
    (heldout_mask), or every document when val_fraction is 0 (inputs that are validation data)."""
    texts, index = [], 0
    for batch in iter_raw_batches(resolve_sources(inputs), text_key):
        docs = decode_batch(batch, text_key)
        keep = heldout_mask(np.arange(index, index + len(docs)), val_fraction) if val_fraction > 0 else None
        texts += [t for i, t in enumerate(docs) if keep is None or keep[i]]
        index += len(docs)
        if len(texts) >= max_docs:
            break
    if not texts:
        raise DataError(f"inputs {inputs}: no validation documents (val_fraction={val_fraction}); raise "
                        "val_fraction or give validation inputs")
    return TokenizedDocuments(tokenizer.encode_documents(texts[:max_docs]))


@dataclass
class _Block:
    epoch: int
    index: int  # -1: the end of epoch `epoch` (a marker, no tokens)
    tokens: np.ndarray  # (n,) int32, documents back to back
    starts: np.ndarray  # (n,) bool, True at each document's first token


@dataclass
class _Failure:
    message: str  # a DataError in a worker process, raised again by the training process


_NO_TOKENS = np.zeros(0, np.int32)


def _identity(x):
    return x


class _BlockStream(torch.utils.data.IterableDataset):
    """The stream's blocks from (epoch, block) on, in order, forever: epoch after epoch, each
    ending with a marker. Worker w of n (DataLoader workers; none: n = 1) reads past every block
    but tokenizes only blocks w, w + n, w + 2n, ... of the sequence, which the DataLoader
    interleaves back into order, so the blocks are the same for any number of workers."""

    def __init__(self, loader: "StreamingLoader", epoch: int, block: int):
        self.loader, self.epoch, self.block = loader, epoch, block

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        k, epoch, first = 0, self.epoch, self.block
        try:
            while True:
                for index, docs in self.loader._epoch_blocks(epoch, first):
                    if k % workers == worker:
                        yield self.loader._make_block(epoch, index, docs)
                    k += 1
                if k % workers == worker:
                    yield _Block(epoch, -1, _NO_TOKENS, np.zeros(0, bool))
                k, epoch, first = k + 1, epoch + 1, 0
        except DataError as e:  # one line for the user, not a worker's traceback
            yield _Failure(str(e))


class StreamingLoader:
    """Micro batches from documents read as a stream (hf: datasets or any input) and tokenized on the fly.

    The token stream: epoch after epoch the documents in input order, in blocks of
    `shuffle_block` documents; block b of epoch e is tokenized at once and its documents
    shuffled by default_rng([seed, e, b]) (a local shuffle: the input should not be sorted);
    held-out documents (val_fraction, see heldout_mask) are left out. Global sample g is
    stream tokens [g * T, g * T + T + 1), the global batch of step s samples [s * G, (s + 1) * G).

    Reading and tokenizing run ahead of the step in `workers` processes (torch DataLoader
    workers; 0: in the training process): worker w tokenizes blocks w, w + n, ... and the
    blocks come back in order, so batches are the same for any number of workers.
    Every rank reads the whole stream and keeps its rows, so the batches and the position do
    not depend on the number of ranks; the price is that each rank tokenizes every document
    (SentencePiece does a few MB of text per second per thread: use num_threads and workers).
    Position (state_dict): the block holding the next sample's first token (epoch, block) and
    the offset in it. Restoring skips the documents before that block without tokenizing them.
    Batches must be asked for in order (as the trainer does); going back re-reads from the
    last restored position.
    """

    def __init__(self, inputs: list[str], tokenizer: Tokenizer, seq_len: int, micro_batch_size: int,
                 grad_accum: int = 1, seed: int = 1234, dp_rank: int = 0, dp_size: int = 1,
                 text_key: str = "text", shuffle_block: int = 1024, val_fraction: float = 0.0,
                 num_threads: int = 1, workers: int = 0, prefetch: int = 2):
        if shuffle_block < 1:
            raise DataError(f"shuffle_block={shuffle_block}: documents per block must be >= 1 (1: no shuffle)")
        self.inputs, self.sources, self.tokenizer = list(inputs), resolve_sources(inputs), tokenizer
        self.seq_len, self.mb, self.ga = seq_len, micro_batch_size, grad_accum
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.text_key, self.block_docs, self.val_fraction = text_key, shuffle_block, val_fraction
        self.num_threads, self.workers, self.prefetch = num_threads, workers, prefetch
        self.global_batch_size = micro_batch_size * grad_accum * dp_size
        self._base = {"step": 0, "consumed_samples": 0, "epoch": 0, "block": 0, "offset": 0}
        self._restored = False
        self._next_sample = None  # nothing read yet
        self._source = None

    def first_sample(self, step: int) -> int:
        return self._base["consumed_samples"] + (step - self._base["step"]) * self.global_batch_size

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This rank's micro batch `micro` of optimizer step `step`.

        Returns tokens, targets: (mb, T) int64; reset, loss_mask: (mb, T) bool.
        """
        self._seek(self.first_sample(step) + (micro * self.dp_size + self.dp_rank) * self.mb)
        samples = []
        for _ in range(self.mb):
            samples.append(self._window(self.seq_len + 1))
            self._advance(self.seq_len)
            self._next_sample += 1
        return make_batch(samples)

    def state_dict(self, step: int) -> dict:
        """The position before step `step`, the same on every rank (this rank reads ahead to it)."""
        g = self.first_sample(step)
        self._seek(g)
        head = self._blocks[0]
        return {"kind": "stream", "step": step, "consumed_samples": g, "epoch": head.epoch, "block": head.index,
                "offset": self._offset, "data": self.fingerprint()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        _check_state(state, "stream", self.fingerprint(), strict)
        self._base = {k: int(state[k]) for k in ("step", "consumed_samples", "epoch", "block", "offset")}
        self._restored = True
        self._next_sample = None

    def fingerprint(self) -> str:
        what = [self.inputs, self.text_key, self.tokenizer.sha256, self.seq_len, self.seed, self.block_docs,
                self.val_fraction]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()

    def __getstate__(self):  # what a DataLoader worker gets (it never holds the stream's position)
        return {**self.__dict__, "_source": None, "_blocks": []}

    # -- the token stream -------------------------------------------------------------

    def _restart(self) -> None:
        """Position the stream at the base (a restored state, or the very beginning)."""
        b = self._base
        self._source = None  # stops the workers of a previous position
        blocks = _BlockStream(self, b["epoch"], b["block"])
        if self.workers > 0:
            self._source = iter(torch.utils.data.DataLoader(
                blocks, batch_size=None, collate_fn=_identity, num_workers=self.workers,
                prefetch_factor=self.prefetch))
        else:
            self._source = iter(blocks)
        self._read_epoch, self._epoch_has_tokens = b["epoch"], False
        self._reader_from_start = b["block"] == 0
        head = self._next_block()
        restored = self._restored  # a saved position names a block with tokens; the start may not
        if restored and ((head.epoch, head.index) != (b["epoch"], b["block"]) or b["offset"] >= len(head.tokens)):
            raise DataError(f"the saved stream position (epoch {b['epoch']}, block {b['block']}, offset "
                            f"{b['offset']}) is not in the data {self.inputs}: the inputs changed since the "
                            "checkpoint; resume with the same inputs or start a new run")
        self._blocks, self._offset, self._next_sample = [head], b["offset"], b["consumed_samples"]

    def _seek(self, g: int) -> None:
        if self._next_sample is None or g < self._next_sample:
            if g < self._base["consumed_samples"]:
                raise DataError(f"sample {g} comes before the restored position "
                                f"({self._base['consumed_samples']}); a stream cannot go back further")
            self._restart()
        self._advance((g - self._next_sample) * self.seq_len)
        self._next_sample = g

    def _window(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n tokens and start flags from the cursor, without moving it."""
        tokens, starts, start, i = [], [], self._offset, 0
        while n > 0:
            if i == len(self._blocks):
                self._blocks.append(self._next_block())
            b = self._blocks[i]
            tokens.append(b.tokens[start:start + n])
            starts.append(b.starts[start:start + n])
            n, start, i = n - len(tokens[-1]), 0, i + 1
        return np.concatenate(tokens), np.concatenate(starts)

    def _advance(self, n: int) -> None:
        """Move the cursor n tokens on; the head block always holds the cursor (offset < its length)."""
        self._offset += n
        while self._offset >= len(self._blocks[0].tokens):
            if len(self._blocks) == 1:
                self._blocks.append(self._next_block())
            self._offset -= len(self._blocks.pop(0).tokens)

    def _next_block(self) -> _Block:
        """The next block with tokens, moving to the next epoch at the end of the input."""
        while True:
            block = next(self._source)
            if isinstance(block, _Failure):
                raise DataError(block.message)
            if block.index < 0:  # the end of an epoch
                if not self._epoch_has_tokens and self._reader_from_start:
                    raise DataError(f"inputs {self.inputs}: no training documents (empty, or all held out by "
                                    f"val_fraction={self.val_fraction})")
                self._read_epoch, self._epoch_has_tokens, self._reader_from_start = block.epoch + 1, False, True
                continue
            if len(block.tokens):
                self._epoch_has_tokens = True
                return block

    def _epoch_blocks(self, epoch: int, first_block: int):
        """Yield (block index, [(document index, text)]) for one pass over the inputs from first_block."""
        index, block, docs = first_block * self.block_docs, first_block, []
        batches = iter_raw_batches(self.sources, self.text_key, skip_docs=index, batch_docs=self.block_docs)
        for batch in batches:
            for text in decode_batch(batch, self.text_key):
                docs.append((index, text))
                index += 1
                if len(docs) == self.block_docs:
                    yield block, docs
                    block, docs = block + 1, []
        if docs:
            yield block, docs

    def _make_block(self, epoch: int, index: int, docs: list[tuple[int, str]]) -> _Block:
        held = heldout_mask(np.array([i for i, _ in docs], np.int64), self.val_fraction)
        texts = [t for (_, t), h in zip(docs, held) if not h]
        enc = self.tokenizer.encode_documents(texts, np.int32, self.num_threads)
        pieces = enc.docs()
        if self.block_docs > 1:
            order = np.random.default_rng([self.seed, epoch, index]).permutation(len(pieces))
            pieces = [pieces[i] for i in order]
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
        starts = np.zeros(len(tokens), bool)
        if pieces:
            starts[np.cumsum([0] + [len(p) for p in pieces[:-1]])] = True
        return _Block(epoch, index, tokens, starts)
