"""Held-out loss and bits per character/byte, over whole documents.

Each document is read from its first token with the recurrent state carried from chunk
to chunk (chunks of seq_len tokens), so every token is predicted with its full history:
the numbers are exact for the document, not an average over cut windows.

    bpc = sum over documents of the nats of every predicted token / ln 2 / characters

Split over data-parallel ranks (group=the dp group): rank r of n reads documents r, r + n, ...
of each dataset and the sums (nats, tokens, characters, bytes) are all-reduced in float64,
so every rank reports the numbers of the whole set (the one-process value up to the order in
which the per-document sums are added).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from megarnn.data.indexed import IndexedDataset
from megarnn.errors import DataError


def text_size(datasets) -> tuple[int, int, int]:
    """(documents, tokens that evaluate() predicts: each document's length - 1, characters) of an
    IndexedDataset, DocumentSubset, TokenizedDocuments or a list of them, from the index alone."""
    docs = tokens = chars = 0
    for ds in datasets if isinstance(datasets, list) else [datasets]:
        if hasattr(ds, "n_tokens"):
            n = int(ds.n_tokens) - len(ds)
        else:
            n = int(np.maximum(np.diff(np.asarray(ds.offsets, np.int64)) - 1, 0).sum())
        docs, tokens, chars = docs + len(ds), tokens + max(n, 0), chars + int(np.sum(ds.n_chars))
    return docs, tokens, chars


@torch.no_grad()
def evaluate(model, datasets: IndexedDataset | list[IndexedDataset], seq_len: int, batch_size: int = 8,
             device: torch.device | None = None, group=None) -> dict[str, float]:
    """Every document of `datasets` -> {"loss": nats/token, "ppl", "bpc": bits/char, "bpb": bits/byte, "tokens"}.

    group: a torch.distributed group of data-parallel ranks that share the work (each reads
    every n-th document, the sums are all-reduced); every rank of it must call. None: this
    process reads every document.

    Raises DataError when there is no text to predict (no documents, or only empty ones)
    rather than report a loss of 0 and 0 bits per character."""
    n_docs, n_tokens, n_chars = text_size(datasets)
    if n_tokens == 0 or n_chars == 0:
        raise DataError(f"the evaluation data has {n_docs} document(s), {n_tokens} token(s) to predict and "
                        f"{n_chars} character(s) of text; evaluate on held-out text")
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    rank, world = _position(group)
    totals = [0.0, 0, 0, 0]  # nats, tokens, characters, bytes
    for ds in datasets if isinstance(datasets, list) else [datasets]:
        _add_dataset(model, ds, seq_len, batch_size, device, totals, range(rank, len(ds), world))
    if was_training:
        model.train()
    if world > 1:
        import torch.distributed as dist
        summed = torch.tensor(totals, dtype=torch.float64)  # integers stay exact below 2^53
        if dist.get_backend(group) == "nccl":
            summed = summed.to(device)
        dist.all_reduce(summed, group=group)
        totals = [summed[0].item(), *(int(v) for v in summed[1:].tolist())]
    nll, tokens, chars, nbytes = totals
    loss = nll / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpc": nll / math.log(2) / max(chars, 1),
            "bpb": nll / math.log(2) / max(nbytes, 1), "tokens": tokens}


def _position(group) -> tuple[int, int]:
    """(this rank's index, ranks) in `group`; (0, 1) without one."""
    if group is None:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def _add_dataset(model, ds: IndexedDataset, seq_len: int, batch_size: int, device, totals: list,
                 which: range) -> None:
    """Add documents `which` of ds to totals (nats, tokens, characters, bytes)."""
    for first in range(0, len(which), batch_size):
        idx = list(which[first:first + batch_size])
        docs = [torch.from_numpy(ds[i].astype("int64")) for i in idx]
        length = max(len(d) for d in docs) - 1
        inp = torch.zeros(len(docs), length, dtype=torch.long)
        tgt = torch.zeros(len(docs), length, dtype=torch.long)
        mask = torch.zeros(len(docs), length, dtype=torch.bool)
        for r, d in enumerate(docs):
            inp[r, :len(d) - 1], tgt[r, :len(d) - 1], mask[r, :len(d) - 1] = d[:-1], d[1:], True
        inp, tgt, mask = inp.to(device), tgt.to(device), mask.to(device)
        state = None
        for s in range(0, length, seq_len):
            logits, state = model(inp[:, s:s + seq_len], state)
            loss = model.cross_entropy(logits, tgt[:, s:s + seq_len])
            totals[0] += (loss * mask[:, s:s + seq_len]).sum().item()
        totals[1] += int(mask.sum())
        totals[2] += int(sum(ds.n_chars[i] for i in idx))
        totals[3] += int(sum(ds.n_bytes[i] for i in idx))
