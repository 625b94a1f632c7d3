"""ParaRNN cells and mixer: GRU / LSTM with diagonal recurrences, trained by a Newton solve.

Danieli et al. 2025, "ParaRNN" (arXiv:2510.21450), section 3. The recurrent weights are
diagonal (vectors a_*), so each channel's next state depends only on its own previous
state and the Jacobian dh_t/dh_{t-1} is diagonal (GRU) or 2x2 per channel (LSTM, state
(c, h)); megarnn.ops.newton solves all T steps in parallel. The input maps B_* are
block-diagonal over heads ("multi-head"), one BlockDiagonalLinear per gate, with the
gate biases b_* inside them; they are applied to the whole sequence before the solve
(`project`), so the cells' steps see pre-activations only.

ParaGRU (eq. 3.1a), per channel:
    z_t = sigmoid(a_z h_{t-1} + B_z x_t + b_z)                update gate
    r_t = sigmoid(a_r h_{t-1} + B_r x_t + b_r)                reset gate
    c_t = tanh(a_c (r_t h_{t-1}) + B_c x_t + b_c)             candidate
    h_t = (1 - z_t) h_{t-1} + z_t c_t

ParaLSTM (eq. 3.1b): coupled input-forget gate (i = 1 - f) and peepholes p_f, p_o:
    f_t = sigmoid(a_f h_{t-1} + p_f c_{t-1} + B_f x_t + b_f)
    z_t = tanh(a_z h_{t-1} + B_z x_t + b_z)
    c_t = f_t c_{t-1} + (1 - f_t) z_t
    o_t = sigmoid(a_o h_{t-1} + p_o c_t + B_o x_t + b_o)      (peephole on the new c_t)
    h_t = o_t tanh(c_t)
The Newton state is [c | h] (S = 2 * hidden); the layer reads out h.

Block-diagonal ParaGRU (BlockGRUCell, block letter "B"): the same equations with the diagonal
a_* replaced by dense n x n blocks A_* (n = model.newton_block_size, 2..16; each head's channels
are whole blocks), so within a block channels mix:
    z = sigmoid(A_z h + B_z x + b_z),  r = sigmoid(A_r h + ...),  c = tanh(A_c (r h) + ...)
and dh_t/dh_{t-1} is block-diagonal, n x n per block:
    J = diag(1 - z) + diag((c - h) z') A_z + diag(z c') A_c (diag(r) + diag(h r') A_r)
(z', c', r' the activations' slopes). Newton's update is then a block-diagonal linear scan
(megarnn.ops.newton.block_scan).

ParaRNNMixer (the paper's RNN block, Fig. 9 / Mamba2-like): in_proj -> (u, gate);
u -> causal depthwise conv -> SiLU -> cell (Newton) -> RMSNorm(h) * SiLU(gate) -> out_proj.
The residual connection and the pre-norm belong to the enclosing block.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megarnn.models.cells import BlockDiagonalLinear
from megarnn.ops.conv import causal_conv1d
from megarnn.ops.newton import DEFAULT_MAX_ITERS, NewtonCell, newton_solve


def _recurrent_init(n: int, width: int) -> nn.Parameter:
    """n diagonal recurrent vectors (n, width): truncated normal, std 1/sqrt(width) in [-0.9, 0.9].

    The training recipe of apple/ml-pararnn ("xavier_gaussian" for A); small |a| keeps the
    Jacobians, and so the Newton solve, well conditioned.
    """
    w = torch.empty(n, width)
    nn.init.trunc_normal_(w, std=1 / math.sqrt(width), a=-0.9, b=0.9)
    return nn.Parameter(w)


class _MultiHeadInput(nn.Module):
    """Gate pre-activations B_g x + b_g, each B_g block-diagonal over heads. (..., W) -> (..., G, W)."""

    def __init__(self, n_gates: int, width: int, n_heads: int):
        super().__init__()
        if width % n_heads:
            raise ValueError(f"ParaRNN: hidden width {width} must be divisible by n_heads {n_heads}")
        hw = width // n_heads
        # Variance 1/fan_in per head (kaiming); biases start at zero.
        self.gates = nn.ModuleList(BlockDiagonalLinear(n_heads, hw, 1 / math.sqrt(hw)) for _ in range(n_gates))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.stack([g(u) for g in self.gates], dim=-2)


class ParaGRUCell(NewtonCell):
    """ParaGRU (module docstring). project: (B, T, W) -> (B, T, 3, W) = (z, r, c) inputs; state (B, W)."""

    jacobian_structure = "diagonal"
    triton_kind = "gru"  # megarnn_kernels.newton implements this cell's math (None in a subclass opts out)

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.state_size = width
        self.project = _MultiHeadInput(3, width, n_heads)
        self.recurrent = _recurrent_init(3, width)  # a_z, a_r, a_c

    def _gates(self, h, x):
        xz, xr, xc = x.unbind(-2)
        a_z, a_r, a_c = self.recurrent
        z = torch.sigmoid(xz + a_z * h)
        r = torch.sigmoid(xr + a_r * h)
        c = torch.tanh(xc + a_c * (r * h))
        return z, r, c

    def step(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """h: (..., W); x: (..., 3, W) -> (..., W)."""
        z, _, c = self._gates(h, x)
        return (1 - z) * h + z * c

    def linearize(self, h_prev, x):
        """f and its diagonal Jacobian (paper eq. 3.2a):
        J = (1 - z) + (c - h) z' a_z + z c' a_c (r + h r' a_r), with s' the activations' slopes."""
        z, r, c = self._gates(h_prev, x)
        a_z, a_r, a_c = self.recurrent
        dr = r * (1 - r) * a_r
        jac = (1 - z) + (c - h_prev) * z * (1 - z) * a_z + z * (1 - c * c) * a_c * (r + h_prev * dr)
        return (1 - z) * h_prev + z * c, jac


class ParaLSTMCell(NewtonCell):
    """ParaLSTM (module docstring). project: (B, T, W) -> (B, T, 3, W) = (f, z, o) inputs;
    state (B, 2W) = [c | h]; 2x2-block Jacobian per channel."""

    jacobian_structure = "block2"
    triton_kind = "lstm"  # megarnn_kernels.newton implements this cell's math (None in a subclass opts out)

    def __init__(self, width: int, n_heads: int):
        super().__init__()
        self.width, self.state_size = width, 2 * width
        self.project = _MultiHeadInput(3, width, n_heads)
        self.recurrent = _recurrent_init(3, width)  # a_f, a_z, a_o
        self.peephole = _recurrent_init(2, width)   # p_f, p_o

    def _gates(self, state, x):
        c, h = state.chunk(2, dim=-1)
        xf, xz, xo = x.unbind(-2)
        a_f, a_z, a_o = self.recurrent
        p_f, p_o = self.peephole
        f = torch.sigmoid(xf + a_f * h + p_f * c)
        z = torch.tanh(xz + a_z * h)
        c_new = f * c + (1 - f) * z
        o = torch.sigmoid(xo + a_o * h + p_o * c_new)
        return c, h, f, z, c_new, o

    def step(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """state: (..., 2W) = [c | h]; x: (..., 3, W) -> (..., 2W)."""
        _, _, _, _, c_new, o = self._gates(state, x)
        return torch.cat([c_new, o * torch.tanh(c_new)], dim=-1)

    def linearize(self, state_prev, x):
        """f and the per-channel 2x2 Jacobian d(c_t, h_t)/d(c_{t-1}, h_{t-1}) (paper eq. 3.2b)."""
        c, h, f, z, c_new, o = self._gates(state_prev, x)
        a_f, a_z, a_o = self.recurrent
        p_f, p_o = self.peephole
        tc = torch.tanh(c_new)
        df = f * (1 - f)
        dcc = f + (c - z) * df * p_f                          # dc_t/dc_{t-1}
        dch = (c - z) * df * a_f + (1 - f) * (1 - z * z) * a_z  # dc_t/dh_{t-1}
        do = o * (1 - o)
        dh_dcnew = tc * do * p_o + o * (1 - tc * tc)         # dh_t/dc_t, through o_t and tanh
        dhc = dh_dcnew * dcc
        dhh = tc * do * a_o + dh_dcnew * dch
        jac = torch.stack([torch.stack([dcc, dch], -1), torch.stack([dhc, dhh], -1)], -2)
        return torch.cat([c_new, o * tc], dim=-1), jac

    def output(self, state: torch.Tensor) -> torch.Tensor:
        return state[..., self.width:]


def _block_recurrent_init(n_mats: int, width: int, block: int) -> nn.Parameter:
    """n_mats block-diagonal recurrent matrices as (n_mats, width / block, block, block): truncated
    normal with std 1 / sqrt(block * width) in +-0.9 / sqrt(block), which is _recurrent_init for
    block = 1; a block's norm stays well below 1 (Newton well conditioned, as the diagonal cells)."""
    w = torch.empty(n_mats, width // block, block, block)
    bound = 0.9 / math.sqrt(block)
    nn.init.trunc_normal_(w, std=1 / math.sqrt(block * width), a=-bound, b=bound)
    return nn.Parameter(w)


class BlockGRUCell(NewtonCell):
    """Block-diagonal ParaGRU (module docstring): recurrent (3, W / n, n, n) = (A_z, A_r, A_c), one
    dense n x n block per n consecutive channels. project: (B, T, W) -> (B, T, 3, W); state (B, W).
    Tensor parallelism splits the blocks (dim 1) with the heads: a block never straddles ranks."""

    jacobian_structure = "block"
    triton_kind = None  # the fused GRU kernels are diagonal; Newton runs with the Triton block scan

    def __init__(self, width: int, n_heads: int, block_size: int = 4):
        super().__init__()
        if not 2 <= block_size <= 16:
            raise ValueError(f"BlockGRUCell: block_size {block_size} must be in 2..16")
        if width % n_heads or (width // n_heads) % block_size:
            raise ValueError(f"BlockGRUCell: the head width {width} / {n_heads} must be a multiple of the block "
                             f"size {block_size}")
        self.state_size, self.block_size = width, block_size
        self.project = _MultiHeadInput(3, width, n_heads)
        self.recurrent = _block_recurrent_init(3, width, block_size)  # A_z, A_r, A_c

    def _mv(self, m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """m (W / n, n, n) times h (..., W) per block -> (..., W)."""
        hb = h.unflatten(-1, (-1, self.block_size))
        return (m @ hb.unsqueeze(-1)).squeeze(-1).flatten(-2)

    def _gates(self, h, x):
        xz, xr, xc = x.unbind(-2)
        a_z, a_r, a_c = self.recurrent
        z = torch.sigmoid(xz + self._mv(a_z, h))
        r = torch.sigmoid(xr + self._mv(a_r, h))
        c = torch.tanh(xc + self._mv(a_c, r * h))
        return z, r, c

    def step(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """h: (..., W); x: (..., 3, W) -> (..., W)."""
        z, _, c = self._gates(h, x)
        return (1 - z) * h + z * c

    def linearize(self, h_prev, x):
        """f and its block Jacobian (..., W / n, n, n) (module docstring)."""
        z, r, c = self._gates(h_prev, x)
        a_z, a_r, a_c = self.recurrent
        n = self.block_size
        blocks = lambda v: v.unflatten(-1, (-1, n))  # noqa: E731
        u = blocks((c - h_prev) * z * (1 - z))  # row scale of A_z
        v = blocks(z * (1 - c * c))  # row scale of A_c (...)
        w = blocks(h_prev * r * (1 - r))  # row scale of A_r inside
        inner = a_c * blocks(r).unsqueeze(-2) + (a_c * w.unsqueeze(-2)) @ a_r  # A_c (diag(r) + diag(w) A_r)
        jac = torch.diag_embed(blocks(1 - z)) + u.unsqueeze(-1) * a_z + v.unsqueeze(-1) * inner
        return (1 - z) * h_prev + z * c, jac


class BlockLSTMCell(NewtonCell):
    """Block-diagonal ParaLSTM: ParaLSTM (module docstring) with dense n x n recurrent blocks A_f, A_z,
    A_o on h (the peepholes p_f, p_o stay diagonal), n = `channels` (2..8):
        f = sigmoid(A_f h + p_f c + B_f x + b_f),  z = tanh(A_z h + B_z x + b_z),
        c' = f c + (1 - f) z,  o = sigmoid(A_o h + p_o c' + B_o x + b_o),  h' = o tanh(c').
    The Newton state is laid out by blocks, [c_k | h_k] for block k (2n values, S = 2W), so the
    Jacobian is block-diagonal with 2n x 2n blocks (block_size = 2n <= 16):
        dc'/dc = diag(f + (c - z) f' p_f)             dc'/dh = diag((c - z) f') A_f + diag((1 - f) z') A_z
        dh'/dc = diag(q) dc'/dc                        dh'/dh = diag(tanh(c') o') A_o + diag(q) dc'/dh
    with q = dh'/dc' = tanh(c') o' p_o + o (1 - tanh(c')^2). The layer reads out the h halves.
    project: (B, T, W) -> (B, T, 3, W) = (f, z, o) inputs; recurrent (3, W / n, n, n); peephole (2, W)."""

    jacobian_structure = "block"
    triton_kind = None

    def __init__(self, width: int, n_heads: int, block_size: int = 4):
        super().__init__()
        if not 2 <= block_size <= 8:
            raise ValueError(f"BlockLSTMCell: block_size {block_size} must be in 2..8 (Newton blocks of 2 n <= 16)")
        if width % n_heads or (width // n_heads) % block_size:
            raise ValueError(f"BlockLSTMCell: the head width {width} / {n_heads} must be a multiple of the block "
                             f"size {block_size}")
        self.channels, self.block_size, self.state_size = block_size, 2 * block_size, 2 * width
        self.project = _MultiHeadInput(3, width, n_heads)
        self.recurrent = _block_recurrent_init(3, width, block_size)  # A_f, A_z, A_o
        self.peephole = _recurrent_init(2, width)  # p_f, p_o

    def _split(self, state):
        """(..., 2W) by blocks -> c, h (..., W / n, n) each."""
        s = state.unflatten(-1, (-1, 2, self.channels))
        return s[..., 0, :], s[..., 1, :]

    def _gates(self, state, x):
        c, h = self._split(state)
        xf, xz, xo = (g.unflatten(-1, (-1, self.channels)) for g in x.unbind(-2))
        a_f, a_z, a_o = self.recurrent
        p_f, p_o = (p.unflatten(-1, (-1, self.channels)) for p in self.peephole)
        mv = lambda m, v: (m @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
        f = torch.sigmoid(xf + mv(a_f, h) + p_f * c)
        z = torch.tanh(xz + mv(a_z, h))
        c_new = f * c + (1 - f) * z
        o = torch.sigmoid(xo + mv(a_o, h) + p_o * c_new)
        return c, h, f, z, c_new, o

    def _join(self, c, h):
        return torch.stack([c, h], dim=-2).flatten(-3)

    def step(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """state: (..., 2W) as blocks [c_k | h_k]; x: (..., 3, W) -> (..., 2W)."""
        _, _, _, _, c_new, o = self._gates(state, x)
        return self._join(c_new, o * torch.tanh(c_new))

    def linearize(self, state_prev, x):
        """f and the (..., W / n, 2n, 2n) block Jacobian (class docstring)."""
        c, h, f, z, c_new, o = self._gates(state_prev, x)
        a_f, a_z, a_o = self.recurrent
        p_f, p_o = (p.unflatten(-1, (-1, self.channels)) for p in self.peephole)
        tc = torch.tanh(c_new)
        df = f * (1 - f)
        do = o * (1 - o)
        dcc = f + (c - z) * df * p_f  # diagonal
        dch = ((c - z) * df).unsqueeze(-1) * a_f + ((1 - f) * (1 - z * z)).unsqueeze(-1) * a_z
        q = tc * do * p_o + o * (1 - tc * tc)
        dhc = q * dcc  # diagonal
        dhh = (tc * do).unsqueeze(-1) * a_o + q.unsqueeze(-1) * dch
        jac = torch.cat([torch.cat([torch.diag_embed(dcc), dch], -1), torch.cat([torch.diag_embed(dhc), dhh], -1)], -2)
        return self._join(c_new, o * tc), jac

    def output(self, state: torch.Tensor) -> torch.Tensor:
        return self._split(state)[1].flatten(-2)


CELLS = {"gru": ParaGRUCell, "lstm": ParaLSTMCell, "block_gru": BlockGRUCell, "block_lstm": BlockLSTMCell}


class GatedRMSNorm(nn.Module):
    """rms_norm(y) * w * silu(gate), normalised in float32 (Mamba2-style output gate)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        yf = y.float() if y.dtype not in (torch.float32, torch.float64) else y
        yf = yf * torch.rsqrt(self.mean_square(yf) + self.eps)
        return (yf * self.weight).to(gate.dtype) * nn.functional.silu(gate)

    def mean_square(self, y: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., 1): the mean over the channels (a split layout sums over its ranks)."""
        return y.pow(2).mean(-1, keepdim=True)


class ParaRNNMixer(nn.Module):
    """ParaRNN temporal mixer. (B, T, d_model) -> (B, T, d_model).

    cell: "gru", "lstm", "block_gru" or "block_lstm" (the block-diagonal cells, with n x n recurrent
    blocks, n = block_size). State: {"conv": (B, conv_width - 1, hidden), "h": (B, S)} with S = hidden
    (GRU, block GRU) or 2 * hidden (LSTM, [c | h]; block LSTM, [c_k | h_k] per block); h is float32
    (float64 for a float64 model). The last
    Newton stats ({"iters", "residual", "fallback", "converged"}) are in self.last_stats.
    """

    def __init__(self, d_model: int, hidden: int, n_heads: int, conv_width: int = 4, cell: str = "gru",
                 max_iters: int = DEFAULT_MAX_ITERS, tol: float | None = None, strict: bool = True,
                 backend: str | None = None, block_size: int = 4):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"ParaRNNMixer: unknown cell {cell!r}; expected one of {sorted(CELLS)}")
        self.in_proj = nn.Linear(d_model, 2 * hidden, bias=False)  # (u, gate)
        nn.init.normal_(self.in_proj.weight, std=1 / math.sqrt(d_model))
        self.conv_weight = nn.Parameter(torch.empty(hidden, conv_width).uniform_(-1, 1) / math.sqrt(conv_width))
        self.conv_bias = nn.Parameter(torch.zeros(hidden))
        self.cell = CELLS[cell](hidden, n_heads, block_size) if cell.startswith("block") else CELLS[cell](hidden, n_heads)
        self.norm = GatedRMSNorm(hidden)
        self.out_proj = nn.Linear(hidden, d_model, bias=False)
        nn.init.normal_(self.out_proj.weight, std=1 / math.sqrt(hidden))
        self.solve_kwargs = {"max_iters": max_iters, "tol": tol, "strict": strict, "backend": backend}
        self.last_stats: dict = {}

    def forward(self, x: torch.Tensor, reset: torch.Tensor | None = None,
                state: dict | None = None) -> tuple[torch.Tensor, dict]:
        """x: (B, T, d_model); reset: (B, T) bool, True at document starts -> y (B, T, d_model), state."""
        state = state or {}
        u, gate = self.in_proj(x).chunk(2, dim=-1)
        u, conv_state = causal_conv1d(u, self.conv_weight, self.conv_bias, state.get("conv"), reset)
        u = nn.functional.silu(u)
        # The solve runs in float32 at least: Newton's residual test needs the precision.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        stats: dict = {}
        h = newton_solve(self.cell, self.cell.project(u).to(acc), state.get("h"), reset=reset,
                         stats=stats, **self.solve_kwargs)
        self.last_stats = stats
        y = self.norm(self.cell.output(h), gate)
        return self.out_proj(y), {"conv": conv_state, "h": h[:, -1]}
