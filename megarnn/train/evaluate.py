"""Held-out loss and bits per character/byte, over whole documents.

Each document is read from its first token with the recurrent state carried from chunk
to chunk (chunks of seq_len tokens), so every token is predicted with its full history:
the numbers are exact for the document, not an average over cut windows.

    bpc = sum over documents of the nats of every predicted token / ln 2 / characters
"""
from __future__ import annotations

import math

import torch

from megarnn.data.indexed import IndexedDataset


@torch.no_grad()
def evaluate(model, datasets: IndexedDataset | list[IndexedDataset], seq_len: int, batch_size: int = 8,
             device: torch.device | None = None) -> dict[str, float]:
    """Every document of `datasets` -> {"loss": nats/token, "ppl", "bpc": bits/char, "bpb": bits/byte, "tokens"}."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    totals = [0.0, 0, 0, 0]  # nats, tokens, characters, bytes
    for ds in datasets if isinstance(datasets, list) else [datasets]:
        _add_dataset(model, ds, seq_len, batch_size, device, totals)
    if was_training:
        model.train()
    nll, tokens, chars, nbytes = totals
    loss = nll / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpc": nll / math.log(2) / max(chars, 1),
            "bpb": nll / math.log(2) / max(nbytes, 1), "tokens": tokens}


def _add_dataset(model, ds: IndexedDataset, seq_len: int, batch_size: int, device, totals: list) -> None:
    n_docs = len(ds)
    for first in range(0, n_docs, batch_size):
        idx = list(range(first, min(first + batch_size, n_docs)))
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
