"""Packing documents into fixed-length training sequences, in an order that resumes exactly.

Every epoch shuffles the documents with a generator seeded by (seed, epoch), lays them
end to end and cuts the stream into samples of seq_len + 1 tokens (stride seq_len); the
samples are shuffled again by (seed, epoch). Global sample g is sample g % n of epoch
g // n, so the global batch of step s is a pure function of (seed, s): resuming at step
s needs only s, and the global batch does not depend on the number of data-parallel
ranks (rank r takes its rows of it).

Each batch carries `reset` (True where a document starts, so recurrent state resets)
and `loss_mask` (False where the target is the first token of the next document).
"""
from __future__ import annotations

import numpy as np
import torch

from megarnn.data.indexed import IndexedDataset
from megarnn.errors import DataError


class PackedLoader:
    def __init__(self, datasets: list[IndexedDataset], seq_len: int, micro_batch_size: int,
                 grad_accum: int = 1, seed: int = 1234, dp_rank: int = 0, dp_size: int = 1):
        self.docs = [ds[i] for ds in datasets for i in range(len(ds))]
        self.seq_len, self.mb, self.ga = seq_len, micro_batch_size, grad_accum
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.global_batch_size = micro_batch_size * grad_accum * dp_size
        total = sum(len(d) for d in self.docs)
        self.samples_per_epoch = (total - 1) // seq_len
        if self.samples_per_epoch < self.global_batch_size:
            raise DataError(
                f"the training data has {total} tokens: {self.samples_per_epoch} samples of data.seq_len="
                f"{seq_len}, fewer than one global batch ({self.global_batch_size}); add data or lower "
                "data.seq_len / train.micro_batch_size")
        self._epoch = None

    def _load_epoch(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.docs))
        docs = [self.docs[i] for i in order]
        self.stream = np.concatenate(docs).astype(np.int64)
        self.starts = np.zeros(len(self.stream) + 1, dtype=bool)
        self.starts[np.cumsum([0] + [len(d) for d in docs[:-1]])] = True
        self.sample_order = rng.permutation(self.samples_per_epoch)
        self._epoch = epoch

    def sample(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Global sample g -> (tokens (T + 1,), starts (T + 1,))."""
        self._load_epoch(g // self.samples_per_epoch)
        i = int(self.sample_order[g % self.samples_per_epoch]) * self.seq_len
        return self.stream[i:i + self.seq_len + 1], self.starts[i:i + self.seq_len + 1]

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This rank's micro batch `micro` of optimizer step `step` (0-based).

        Returns tokens, targets: (mb, T) int64; reset, loss_mask: (mb, T) bool.
        """
        first = step * self.global_batch_size + (micro * self.dp_size + self.dp_rank) * self.mb
        toks, starts = zip(*(self.sample(first + j) for j in range(self.mb)))
        toks, starts = np.stack(toks), np.stack(starts)
        return {
            "tokens": torch.from_numpy(toks[:, :-1].copy()),
            "targets": torch.from_numpy(toks[:, 1:].copy()),
            "reset": torch.from_numpy(starts[:, :-1].copy()),
            "loss_mask": torch.from_numpy(~starts[:, 1:]),
        }
