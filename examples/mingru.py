"""minGRU as a megarnn mixer from outside the package (Feng et al. 2024, "Were RNNs All We
Needed?", sec. 3.1): one file, no change to megarnn.

    z_t = sigmoid(W_z x_t + b_z)              update gate
    c_t = W_h x_t + b_h                       candidate (no dependence on h_{t-1})
    h_t = (1 - z_t) h_{t-1} + z_t c_t         a diagonal linear scan: a_t = 1 - z_t, b_t = z_t c_t

Use it with block letter X and model.mixer naming this class, e.g.
    megarnn train configs/quickstart.yaml model.block_pattern=XXA model.mixer=mingru:MinGRU
with this directory on PYTHONPATH.
"""
import torch
from torch import nn

from megarnn.ops import linear_scan


class MinGRU(nn.Module):
    """(B, T, d_model) -> (B, T, d_model); state {"h": (B, lru_width) float32}."""

    # How tensor parallelism splits the parameters: each rank keeps a slice of the channels
    # (column-parallel projections in, row-parallel out), so the scan needs no communication.
    tp_plan = {"gate_proj": "column", "cand_proj": "column", "out_proj": "row"}

    @staticmethod
    def tp_divisible(c):
        return {"model.lru_width": c.lru_width}  # what parallel.tp must divide

    def __init__(self, c):  # c: the resolved ModelConfig
        super().__init__()
        self.gate_proj = nn.Linear(c.d_model, c.lru_width)
        self.cand_proj = nn.Linear(c.d_model, c.lru_width)
        self.out_proj = nn.Linear(c.lru_width, c.d_model, bias=False)
        self.backend = c.scan_backend or None

    def forward(self, x, reset=None, state=None):
        """x: (B, T, D); reset: (B, T) bool, True where a document starts; state from the last call."""
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # the scan's precision
        z = torch.sigmoid(self.gate_proj(x)).to(acc)
        a = 1 - z
        if reset is not None:
            a = a.masked_fill(reset[..., None], 0.0)  # a document start forgets the state
        h0 = None if state is None else state["h"]
        h = linear_scan(a, z * self.cand_proj(x).to(acc), h0, backend=self.backend)
        return self.out_proj(h.to(x.dtype)), {"h": h[:, -1]}
