"""Closed-form bytes a rank sends per micro batch (forward + backward) over its tensor-parallel
group, as the layers of megarnn/parallel/tensor.py communicate. Ring collectives over p ranks
move, per rank: all-reduce 2 (p - 1) / p of the buffer, all-gather and reduce-scatter
(p - 1) / p of the full (gathered / unscattered) buffer.

With N = B x T_local x D activations (T_local = T / cp):
    per sublayer (a mixer, an MLP)  TP: all-reduce N forward (row-parallel output) and backward
                                    (the sublayer input's copy); SP: all-gather + reduce-scatter
                                    each way. Equal bytes: a ring all-reduce is the two.
    embedding, head input           one more sublayer's worth each (vocabulary-parallel).
    cross-entropy                   3 all-reduces of B x T_local float32 (max, sum, target logit).
    ParaRNN gated norm              an all-reduce of B x T_local float32 each way per layer.
    MQA's replicated key / value    their weight gradients summed: 2 all-reduces of D x head_dim.
    SP only                         norm weights and row-parallel biases are applied to each
                                    rank's own tokens: their gradients are all-reduced (O(D)).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from megarnn import registry


def _ring(p: int) -> float:
    return (p - 1) / p


def tp_bytes_per_micro_batch(c, micro_batch: int, seq_len: int, tp: int, cp: int = 1,
                             sequence_parallel: bool = False, act_bytes: int = 2, param_bytes: int = 4,
                             layers: list[int] | None = None, first: bool = True, last: bool = True
                             ) -> dict[str, float]:
    """{"activations", "loss", "params", "total"}: bytes a rank sends over the tp group per micro
    batch. c: a resolved ModelConfig. act_bytes: the activations' element size (2 in bf16).
    A pipeline stage: `layers` (its block indices; default all), `first` (it runs the embedding),
    `last` (the final norm, head and loss)."""
    if tp == 1:
        return {"activations": 0.0, "loss": 0.0, "params": 0.0, "total": 0.0}
    r = _ring(tp)
    tokens = micro_batch * seq_len // cp
    n = tokens * c.d_model * act_bytes
    letters = c.block_types()
    letters = [letters[i] for i in (range(len(letters)) if layers is None else layers)]
    kinds = [registry.block_kind(k, c) for k in letters]
    sublayers = sum(2 if k.has_mlp else 1 for k in kinds)
    # A sublayer: one all-reduce (or all-gather + reduce-scatter) each way. The embedding's output
    # and the head's input: one all-reduce in one direction (TP) or one of each collective (SP).
    activations = (2 * sublayers + first + last) * 2 * r * n
    loss = 3 * 2 * r * tokens * 4 if last else 0.0
    params = 0.0
    for letter, k in zip(letters, kinds):
        if letter in "GL":  # the gated norm's mean square over split channels, forward and backward
            activations += 2 * 2 * r * tokens * 4
        if letter == "A" and c.n_kv_heads == 1:
            params += 2 * 2 * r * c.d_model * c.head_dim * param_bytes
        if sequence_parallel:
            norms = 2 if k.has_mlp else 1
            # row-parallel biases: R's linear_out, A's o_proj, and the MLP's down_proj
            biases = (letter in "RA") + (1 if k.has_mlp else 0)
            params += (norms + biases) * 2 * r * c.d_model * param_bytes
    if sequence_parallel and last:
        params += 2 * r * c.d_model * param_bytes  # the final norm
    return {"activations": activations, "loss": loss, "params": params, "total": activations + loss + params}


class CountBytes:
    """Counts the bytes this rank sends, per collective kind (ring formulas above), while active:
    with CountBytes(world) as count: ...; count.total(). It wraps torch.distributed's functions,
    so every caller that looks them up at call time (all of megarnn, DeepSpeed) is counted."""

    def __init__(self, world: int):
        self.r, self.p, self.bytes, self._saved = (world - 1) / world, world, defaultdict(float), {}

    def __enter__(self):
        for name, cost in [("all_reduce", lambda t, *a, **k: 2 * self.r * _nbytes(t)),
                           ("all_gather", lambda out, t, *a, **k: self.r * self.p * _nbytes(t)),
                           ("all_gather_into_tensor", lambda out, t, *a, **k: self.r * _nbytes(out)),
                           ("reduce_scatter_tensor", lambda out, t, *a, **k: self.r * _nbytes(t)),
                           ("reduce_scatter", lambda out, ts, *a, **k: self.r * sum(map(_nbytes, ts)))]:
            fn = self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, fn, cost))
        return self

    def _wrap(self, name, fn, cost):
        def counted(*args, **kwargs):
            self.bytes[name] += cost(*args, **kwargs)
            return fn(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def total(self) -> float:
        return sum(self.bytes.values())


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
