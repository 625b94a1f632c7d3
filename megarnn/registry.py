"""One entry per block kind: the only place that says what a block letter is.

An entry declares its temporal mixer class, how each of the mixer's parameters splits under
tensor parallelism, what tp must divide, its FLOPs per token beyond the matmuls, and the
Hugging Face architecture its family exports to. config.py (letters, divisibility),
models/ (building), parallel/plan.py (the TP pass), RecurrentLM.flops_per_token (MFU) and
the export read it; nothing else names a block kind.

    letter  mixer                                   tp splits
    R       models.blocks.RecurrentBlock            linear_x/_y column, conv + RG-LRU per channel / head, linear_out row
    A       models.blocks.LocalAttentionBlock       q (and k, v when n_kv_heads > 1) column, o row
    M       models.mamba2.Mamba2Mixer               in_proj per component (z, x, B, C, dt), conv, heads; out_proj row
    G / L   models.pararnn.ParaRNNMixer             in_proj per component (u, gate), conv, cell by channel; out_proj row
    B / K   models.pararnn.ParaRNNMixer             as G / L; the block-diagonal cells' n x n recurrent blocks by block
    T       models.linear_attention.GLAMixer        q/k/v/g and the gate's second (per-key) linear column, its
                                                    low-rank first replicated, per-head norm by heads; o row
    D       models.linear_attention.GatedDeltaNetMixer  q/k/v/g/a/b column, convs, A_log, dt_bias, norm by heads; o row
    U       models.lru.LRUMixer                     in_proj (B, (re, im) per state channel) column, nu_log / theta_log /
                                                    gamma_log by channel, out_proj (C) row; D whole on every rank
    N / O   models.minrnn.MinGRUMixer / MinLSTMMixer  in_proj per component (gates, candidate) column; out_proj row
    X       the user's class named by model.mixer   its own `tp_plan` (README, "Your own cell")

A mixer is built as Class(config) (config resolved) unless the entry has `build`, and is
called mixer(x, reset, state) -> (y, state) (attention also gets pos=). Split rules
(`Split`): "column" / "row" swap an nn.Linear for its column- / row-parallel version,
"replicated" keeps a full nn.Linear whose output feeds this rank's heads, "dim0" / "dim1"
keep this rank's slice of a parameter along that dim, "norm" swaps a GatedRMSNorm for one
over split channels. `components(mixer)` lists packed parts cut separately (Megatron's
per-component in_proj), so a checkpoint can be resharded.

This module imports nothing of megarnn (classes are named by "module:Class" and resolved
when built), so config.py can read it without an import cycle.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from megarnn.errors import ConfigError


@dataclass(frozen=True)
class Split:
    """How one parameter (or nn.Linear) of a mixer is cut across a tensor-parallel group."""

    how: str  # "column" | "row" | "replicated" | "dim0" | "dim1" | "norm"
    components: Callable | None = None  # mixer -> full sizes of packed parts along the cut dim

    def __post_init__(self):
        if self.how not in ("column", "row", "replicated", "dim0", "dim1", "norm"):
            raise ConfigError(f"tensor-parallel split {self.how!r}; expected column, row, replicated, dim0, dim1 or norm")


def _splits(plan: dict) -> dict[str, Split]:
    return {k: v if isinstance(v, Split) else Split(v) for k, v in plan.items()}


@dataclass(frozen=True)
class BlockKind:
    letter: str
    name: str
    mixer: str  # "module:Class"
    tp_plan: Callable  # config -> {parameter or submodule path (glob * allowed): Split or rule name}
    tp_divisible: Callable = lambda c: {}  # config -> {what: size} that tp must divide
    localize: Callable | None = None  # (mixer, tp) -> None: attribute counts after the split
    tp_check: Callable = lambda c, tp: None  # (config, tp) -> raise ConfigError: other rules than "divides"
    flops: Callable = lambda c, seq_len: 0.0  # forward FLOPs per token beyond 2 x matmul weights
    has_mlp: bool = True  # Griffin's residual block (mixer + gated MLP); False: Mamba2's (mixer only)
    families: tuple = field(default=())
    build: Callable | None = None  # (the mixer class, config) -> mixer, when Class(config) does not fit
    # Context parallelism per batch row and rank, forward + backward: (fp32 elements each rank
    # all-gathers to the others: carries, chunk transitions; bytes sent point to point: conv halos,
    # Newton's state shifts), given (config, activation bytes). megarnn plan's "cp" column.
    cp_exchange: Callable = lambda c, act: (0.0, 0.0)
    cp_tp_split: bool = True  # tensor parallelism splits those exchanges (False: replicated KV heads)

    def mixer_class(self):
        return resolve_class(self.mixer)

    def build_mixer(self, c):
        cls = self.mixer_class()
        return self.build(cls, c) if self.build is not None else cls(c)

    def splits(self, c) -> dict[str, Split]:
        return _splits(self.tp_plan(c))


def resolve_class(path: str):
    """ "package.module:Class" -> the class, or a ConfigError saying what is wrong."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ConfigError(f"model.mixer={path!r}: expected 'package.module:ClassName'")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.mixer={path!r} cannot be imported ({e}); check that the module is on "
                          f"PYTHONPATH (or installed) and defines {name}") from e
    return cls


# --- the built-in kinds ------------------------------------------------------------------------

def _heads(c) -> dict:
    return {"model.n_heads": c.n_heads, "the MLP width (model.mlp_width)": c.mlp_width}


def _recurrent_localize(m, tp):
    m.rg_lru.input_gate.n_blocks //= tp
    m.rg_lru.recurrent_gate.n_blocks //= tp


def _attention_plan(c):
    kv = "column" if c.n_kv_heads > 1 else "replicated"
    return {"q_proj": "column", "k_proj": kv, "v_proj": kv, "o_proj": "row"}


def _attention_flops(c, seq_len):
    """2 x 2 x heads x head_dim x (mean keys attended; query i sees min(i + 1, window))."""
    keys = sum(min(i + 1, c.attention_window) for i in range(seq_len)) / seq_len
    return 2 * 2 * c.n_heads * c.head_dim * keys


def _mamba2_heads(c) -> int:
    return c.expand * c.d_model // c.ssm_head_dim


def _mamba2_plan(c):
    # B and C are n_groups blocks: cut by group when tp <= n_groups, else each group kept whole by
    # tp / n_groups ranks (its heads' ranks), so the shipped n_groups = 1 configs split by heads.
    gn = lambda m: [m.n_groups * m.c.d_state, m.n_groups]  # noqa: E731
    conv = lambda m: [m.d_inner, gn(m), gn(m)]  # noqa: E731
    return {"in_proj": Split("column", lambda m: [m.d_inner, *conv(m), m.n_heads]),
            "conv_weight": Split("dim0", conv), "conv_bias": Split("dim0", conv),
            "dt_bias": "dim0", "A_log": "dim0", "D": "dim0", "norm": "norm", "out_proj": "row"}


def _mamba2_localize(m, tp):
    m.d_inner, m.n_heads, m.n_groups = m.d_inner // tp, m.n_heads // tp, max(m.n_groups // tp, 1)
    m.conv_dim = m.d_inner + 2 * m.n_groups * m.c.d_state


def _mamba2_tp_check(c, tp):
    if c.n_groups % tp and tp % c.n_groups:
        raise ConfigError(f"parallel.tp={tp} and model.n_groups={c.n_groups}: one must divide the other (each "
                          "rank takes whole groups, or a group's heads are spread over tp / n_groups ranks)")


def _ssd_flops(c, seq_len):
    """Inside a chunk of Q = min(chunk, T) steps a token meets (Q + 1) / 2 earlier ones on average:
    the scores C.B^T per GROUP (2 N each: every head of a group reads the same B and C) and their
    product with x per head (2 P each); plus per head the state in and out (4 P N)."""
    q = min(c.chunk_size, seq_len)
    seen = (q + 1) / 2
    return c.n_groups * 2 * c.d_state * seen + _mamba2_heads(c) * (2 * c.ssm_head_dim * seen
                                                                     + 4 * c.ssm_head_dim * c.d_state)


def _pararnn_plan(peephole: bool):
    return lambda c: {**_PARARNN_PLAN, **({"cell.peephole": "dim1"} if peephole else {})}


_PARARNN_PLAN = {"in_proj": Split("column", lambda m: [m.out_proj.in_features] * 2),
            "conv_weight": "dim0", "conv_bias": "dim0",
            "cell.project.gates.*.weight": "dim0", "cell.project.gates.*.bias": "dim0",
            "cell.recurrent": "dim1", "norm": "norm", "out_proj": "row"}


def _pararnn_localize(m, tp):
    for gate in m.cell.project.gates:
        gate.n_blocks //= tp
    if hasattr(m.cell, "width"):
        m.cell.width //= tp
    m.cell.state_size //= tp


def _pararnn_build(cell):
    def build(cls, c):  # cls: ParaRNNMixer, resolved from the entry's name (no import here)
        return cls(c.d_model, c.lru_width, c.n_heads, c.conv_width, cell, c.newton_max_iters,
                   c.newton_tol or None, backend=c.scan_backend or None, block_size=c.newton_block_size)
    return build


def _block_gru_flops(c, seq_len):
    """The block-diagonal paraGRU's (paraLSTM's) three n x n block mat-vecs per step (A_z h, A_r h,
    A_c (r h); A_f h, A_z h, A_o h):
    2 n multiply-adds each per channel, 6 n lru_width per token (one evaluation of the cell, as the
    diagonal cells' elementwise recurrences count 0; Newton's extra iterations are not model FLOPs)."""
    return 6 * c.newton_block_size * (c.lru_width or c.d_model)


def la_widths(c, kind: str) -> tuple[int, int]:
    """(key, value) widths over all heads of a linear-attention block ("T" GLA, "D" Gated DeltaNet);
    the same defaults as megarnn/models/linear_attention.py (gla_dims, deltanet_dims)."""
    key = c.la_key_dim or (c.d_model // 2 if kind == "T" else 3 * c.d_model // 4)
    return key, c.la_value_dim or (c.d_model if kind == "T" else 2 * key)


def _la_divisible(c) -> dict:
    return {"model.n_heads (the linear-attention heads)": c.n_heads,
            "the MLP width (model.mlp_width)": c.mlp_width}


def _la_flops(kind: str):
    """Per head and token of the chunked forms, with Q = min(la_chunk_size, T) and (Q + 1) / 2
    positions seen inside a chunk (as attention and SSD count them): GLA 2 (K + V) per position
    seen (scores, their product with v) + 4 K V (the state in and out); the delta rule 2 (4 K + 2 V)
    per position seen (k.k^T, q.k^T, the UT transform's triangular solve of [beta v | w] and the
    products with u and w) + 2 K^2 + 4 K V (the chunk's transition, state in and out)."""
    def flops(c, seq_len):
        key, value = la_widths(c, kind)
        K, V, H = key // c.n_heads, value // c.n_heads, c.n_heads
        seen = (min(c.la_chunk_size, seq_len) + 1) / 2
        if kind == "T":
            return H * (2 * (K + V) * seen + 4 * K * V)
        return H * (2 * (4 * K + 2 * V) * seen + 2 * K * K + 4 * K * V)
    return flops


_GLA_PLAN = {"q_proj": "column", "k_proj": "column", "v_proj": "column", "g_proj": "column",
             "gk_proj.0": "replicated", "gk_proj.1": "column", "norm.weight": "dim0", "o_proj": "row"}

_DELTANET_PLAN = {"q_proj": "column", "k_proj": "column", "v_proj": "column", "g_proj": "column",
                  "a_proj": "column", "b_proj": "column", "conv_q": "dim0", "conv_k": "dim0", "conv_v": "dim0",
                  "A_log": "dim0", "dt_bias": "dim0", "norm.weight": "dim0", "o_proj": "row"}


def _lru_divisible(c) -> dict:
    return {"model.lru_width (the recurrent channels)": c.lru_width, "the MLP width (model.mlp_width)": c.mlp_width}


_LRU_PLAN = {"in_proj": "column", "out_proj": "row", "nu_log": "dim0", "theta_log": "dim0", "gamma_log": "dim0"}


def _minrnn_plan(parts: int):
    return lambda c: {"in_proj": Split("column", lambda m: [m.width] * parts), "out_proj": "row"}


# Context-parallel exchanges (BlockKind.cp_exchange), per batch row: what each op of megarnn/ops
# gathers or sends under cp (megarnn/ops/context.py). The scans' summaries go through carry_in, an
# all-gather with autograd: the forward gathers the other ranks' shares (cp - 1), the backward
# all-reduces the gradient of all cp shares (2 (cp - 1) in a ring): 3 shares in all, as counted
# (tests/parallel/test_cp_bytes.py). Newton's solves gather without autograd, once an iteration and
# once for the adjoint.

def _conv_halo(c, width: int, act: int) -> float:
    return 2 * (c.conv_width - 1) * width * act


def _diagonal_cp(c, act):
    """RG-LRU: the chunk's decay product and last state (2 W) gathered; the conv halo."""
    return 3 * 2 * c.lru_width, _conv_halo(c, c.lru_width, act)


def _ssd_cp(c, act):
    H = _mamba2_heads(c)
    return 3 * H * (1 + c.ssm_head_dim * c.d_state), _conv_halo(c, c.expand * c.d_model + 2 * c.n_groups * c.d_state, act)


def _attention_cp(c, act):
    return 0.0, 2 * (c.attention_window - 1) * 2 * c.n_kv_heads * c.head_dim * act


def _newton_cp(per_width: Callable, state_per_width: int):
    """A Newton cell across ranks, at most newton_max_iters iterations (an upper bound; converged
    solves take ~5): every iteration's linear solve gathers the chunk's Jacobian product and last
    value (per_width(c) x lru_width elements) and shifts the state (state_per_width x lru_width,
    fp32) to the next rank; the backward's adjoint is one more gathered solve."""
    def exchange(c, act):
        W, k = c.lru_width, c.newton_max_iters
        return (k + 1) * per_width(c) * W, _conv_halo(c, W, act) + k * state_per_width * W * 4
    return exchange


def _la_cp(kind: str):
    """GLA: the chunk's decay (K per head) and last state (K x V per head) gathered; the delta rule:
    its transition (K x K per head) and last state, and the short convolutions' halos."""
    def exchange(c, act):
        key, value = la_widths(c, kind)
        per_head = (key if kind == "T" else key * key / c.n_heads) + key * value / c.n_heads
        halo = 0.0 if kind == "T" else _conv_halo(c, 2 * key + value, act)
        return 3 * per_head, halo
    return exchange


def _lru_cp(c, act):
    """lambda^T and the last state, complex (re, im): 4 W."""
    return 3 * 4 * c.lru_width, 0.0


def _minrnn_cp(c, act):
    return 3 * 2 * c.lru_width, 0.0


BLOCKS: dict[str, BlockKind] = {k.letter: k for k in [
    BlockKind("R", "RG-LRU recurrent block", "megarnn.models.blocks:RecurrentBlock",
              lambda c: {"linear_x": "column", "linear_y": "column", "linear_out": "row",
                         "conv_weight": "dim0", "conv_bias": "dim0", "rg_lru.*_gate.weight": "dim0",
                         "rg_lru.*_gate.bias": "dim0", "rg_lru.recurrent_param": "dim0"},
              _heads, _recurrent_localize, families=("griffin", "hawk"), cp_exchange=_diagonal_cp),
    BlockKind("A", "local multi-query attention block", "megarnn.models.blocks:LocalAttentionBlock",
              _attention_plan, lambda c: {**_heads(c), **({"model.n_kv_heads": c.n_kv_heads} if c.n_kv_heads > 1 else {})},
              flops=_attention_flops, families=("griffin",), cp_exchange=_attention_cp, cp_tp_split=False),
    BlockKind("M", "Mamba2 block (SSD)", "megarnn.models.mamba2:Mamba2Mixer", _mamba2_plan,
              lambda c: {"the Mamba2 head count": _mamba2_heads(c)},
              _mamba2_localize, _mamba2_tp_check, _ssd_flops, has_mlp=False, families=("mamba2",),
              cp_exchange=_ssd_cp),
    BlockKind("G", "paraGRU block (Newton)", "megarnn.models.pararnn:ParaRNNMixer", _pararnn_plan(False), _heads,
              _pararnn_localize, families=("pararnn",), build=_pararnn_build("gru"),
              cp_exchange=_newton_cp(lambda c: 2, 1)),
    BlockKind("L", "paraLSTM block (Newton)", "megarnn.models.pararnn:ParaRNNMixer", _pararnn_plan(True), _heads,
              _pararnn_localize, families=("pararnn",), build=_pararnn_build("lstm"),
              cp_exchange=_newton_cp(lambda c: 6, 2)),  # 2 x 2 (c, h) blocks: product 4 + last 2
    # The recurrent blocks (3, W / n, n, n) split along dim 1 with the channels: n divides the head width
    # (ModelConfig.validate), so tp dividing n_heads keeps every block on one rank.
    BlockKind("B", "block-diagonal paraGRU block (Newton, n x n recurrent blocks)",
              "megarnn.models.pararnn:ParaRNNMixer", _pararnn_plan(False), _heads, _pararnn_localize,
              flops=_block_gru_flops, families=("pararnn",), build=_pararnn_build("block_gru"),
              cp_exchange=_newton_cp(lambda c: c.newton_block_size + 1, 1)),  # n x n blocks: n^2 + n per n
    BlockKind("K", "block-diagonal paraLSTM block (Newton, n x n recurrent blocks, 2n x 2n Jacobian blocks)",
              "megarnn.models.pararnn:ParaRNNMixer", _pararnn_plan(True), _heads, _pararnn_localize,
              flops=_block_gru_flops, families=("pararnn",), build=_pararnn_build("block_lstm"),
              cp_exchange=_newton_cp(lambda c: 4 * c.newton_block_size + 2, 2)),  # 2n x 2n blocks per n
    BlockKind("T", "gated linear attention block (GLA)", "megarnn.models.linear_attention:GLAMixer",
              lambda c: dict(_GLA_PLAN), _la_divisible, flops=_la_flops("T"), families=("gla",),
              cp_exchange=_la_cp("T")),
    BlockKind("D", "Gated DeltaNet block", "megarnn.models.linear_attention:GatedDeltaNetMixer",
              lambda c: dict(_DELTANET_PLAN), _la_divisible, flops=_la_flops("D"), families=("deltanet",),
              cp_exchange=_la_cp("D")),
    # The recurrences below are elementwise (a diagonal complex scan, a log-space scan): no FLOPs
    # beyond their projections, as every family's gates and scans are left out.
    BlockKind("U", "LRU block (complex diagonal recurrence)", "megarnn.models.lru:LRUMixer",
              lambda c: dict(_LRU_PLAN), _lru_divisible, families=("lru",), cp_exchange=_lru_cp),
    BlockKind("N", "minGRU block (log-space scan)", "megarnn.models.minrnn:MinGRUMixer", _minrnn_plan(2),
              _lru_divisible, families=("mingru",), cp_exchange=_minrnn_cp),
    BlockKind("O", "minLSTM block (log-space scan)", "megarnn.models.minrnn:MinLSTMMixer", _minrnn_plan(3),
              _lru_divisible, families=("minlstm",), cp_exchange=_minrnn_cp),
]}

# The gated MLP of every residual block with an MLP.
MLP_PLAN = {"gate_proj": Split("column"), "up_proj": Split("column"), "down_proj": Split("row")}

PLUGIN_LETTER = "X"


def plugin_kind(path: str) -> BlockKind:
    """The entry of a user's mixer class (model.mixer), read from its class attributes:
    tp_plan (dict, default: nothing split, so the mixer must then be run with tp = 1), optional
    tp_divisible(c) -> {what: size}, localize(self, tp), flops_per_token(c, seq_len),
    cp_exchange(c, act) -> (elements gathered, bytes sent)."""
    cls = resolve_class(path)
    plan = getattr(cls, "tp_plan", None)
    return BlockKind(PLUGIN_LETTER, f"user mixer {path}", path,
                     tp_plan=lambda c: dict(plan) if plan is not None else {},
                     tp_divisible=getattr(cls, "tp_divisible", lambda c: {}),
                     localize=(lambda m, tp: m.localize(tp)) if hasattr(cls, "localize") else None,
                     flops=getattr(cls, "flops_per_token", lambda c, seq_len: 0.0),
                     cp_exchange=getattr(cls, "cp_exchange", lambda c, act: (0.0, 0.0)),
                     has_mlp=getattr(cls, "has_mlp", True), families=())


def block_kind(letter: str, c) -> BlockKind:
    """The entry for one letter of model.block_pattern (c: a ModelConfig)."""
    if letter == PLUGIN_LETTER:
        if not c.mixer:
            raise ConfigError(f"model.block_pattern={c.block_pattern!r} uses {PLUGIN_LETTER!r} (your own mixer) "
                              "but model.mixer is empty; set model.mixer=package.module:ClassName")
        return plugin_kind(c.mixer)
    try:
        return BLOCKS[letter]
    except KeyError:
        raise ConfigError(f"block letter {letter!r} is not known; expected one of "
                          f"{sorted([*BLOCKS, PLUGIN_LETTER])}") from None


def family_letters(family: str) -> str:
    """The built-in letters a family may use ("" for an unknown family); X is allowed in every family."""
    return "".join(k.letter for k in BLOCKS.values() if family in k.families)


FAMILIES = sorted({f for k in BLOCKS.values() for f in k.families})
