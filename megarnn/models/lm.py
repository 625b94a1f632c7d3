"""RecurrentLM: embedding -> residual blocks from a pattern ("RRA", "M") -> RMSNorm -> head.

Griffin / Hawk as in RecurrentGemma: the embedding is scaled by sqrt(D) (rounded to
bfloat16, as the reference implementation does) and the logits are soft-capped,
cap * tanh(logits / cap). Mamba2 as in transformers' Mamba2ForCausalLM, and ParaRNN:
neither.

    logits, state = model(tokens)                    # parallel form, tokens (B, T)
    logits, state = model.step(tokens[:, :1], state) # one token, constant memory

The state is {"pos": int, "layers": [per-layer dict]}: recurrent layers keep their conv
inputs and RG-LRU state, attention layers at most window - 1 keys and values.
"""
from __future__ import annotations

import contextlib
import hashlib
import math

import torch
import torch.utils.checkpoint
from torch import nn

from megarnn import registry
from megarnn.config import ModelConfig
from megarnn.models.blocks import ResidualBlock, RMSNorm
from megarnn.models.cells import at_least_float32
from megarnn.models.mamba2 import Mamba2Block
from megarnn.ops.scan import sequence_start  # compile-safe (the ContextVar is read outside dynamo)


class TokenCrossEntropy(nn.Module):
    """Per-token cross-entropy in float32: logits (B, T, V), targets (B, T) -> (B, T).
    (A layout whose logits hold a slice of the vocabulary swaps in its own.)"""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(at_least_float32(logits).flatten(0, 1), targets.flatten(),
                                           reduction="none").view(targets.shape)


@contextlib.contextmanager
def _seeded(seed: int | None, name: str):
    """The global RNG seeded by (seed, name) inside the block and restored after; nothing when
    seed is None. The seed is a stable hash (not Python's salted hash()) of both."""
    if seed is None:
        yield
        return
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
        yield


def build_block(c: ModelConfig, kind: str) -> nn.Module:
    """One layer: forward(x, reset, state, pos) -> (x, state); with or without the gated MLP as
    the kind's registry entry says."""
    return ResidualBlock(c, kind) if registry.block_kind(kind, c).has_mlp else Mamba2Block(c, kind)


class RecurrentLM(nn.Module):
    """seed: None builds every piece from the global RNG, in order (as any nn.Module). An int
    builds each piece (embed_tokens, layers.i, final_norm, lm_head) from its own generator
    seeded by (seed, piece name): a piece's initial values then do not depend on which other
    pieces exist, so a rank can build only its own (make_piece), and every layout starts from
    the weights one process would."""

    def __init__(self, config: ModelConfig, seed: int | None = None):
        super().__init__()
        config.validate()
        if config.vocab_size <= 0:
            raise ValueError("RecurrentLM needs model.vocab_size > 0 (the trainer fills it from the tokenizer)")
        self.config, self.seed = config, seed
        c = self.c = config.resolved()
        self.embed_tokens = self.make_piece("embed_tokens")
        self.layers = nn.ModuleList(self.make_piece(f"layers.{i}") for i in range(c.n_layers))
        griffin = c.family in ("griffin", "hawk")
        self.final_norm = self.make_piece("final_norm")
        self.lm_head = None if c.tie_embeddings else self.make_piece("lm_head")
        self.embed_scale = torch.tensor(math.sqrt(c.d_model), dtype=torch.bfloat16, device="cpu").item() if griffin else 1.0
        self.soft_cap = c.logits_soft_cap if griffin else 0.0
        self.loss = TokenCrossEntropy()
        self.checkpoint_every = 0  # activation checkpointing of every k-th block (0: none)

    def piece_names(self) -> list[str]:
        """The model's top-level pieces, in order: what a pipeline stage owns a subset of."""
        c = self.c
        return ["embed_tokens", *(f"layers.{i}" for i in range(c.n_layers)), "final_norm",
                *([] if c.tie_embeddings else ["lm_head"])]

    def make_piece(self, name: str) -> nn.Module:
        """A freshly initialized piece (on the current default device): from the global RNG
        without a seed, else from its own generator seeded by (seed, name)."""
        with _seeded(self.seed, name):
            return self._build_piece(name)

    def _build_piece(self, name: str) -> nn.Module:
        c = self.c
        if name == "embed_tokens":
            embed = nn.Embedding(c.vocab_size, c.d_model)
            nn.init.normal_(embed.weight, std=1 / math.sqrt(c.d_model))
            return embed
        if name == "final_norm":
            return RMSNorm(c.d_model, c.norm_eps, unit_offset=c.family != "mamba2")
        if name == "lm_head":
            head = nn.Linear(c.d_model, c.vocab_size, bias=False)
            nn.init.normal_(head.weight, std=1 / math.sqrt(c.d_model))
            return head
        return build_block(c, c.block_types()[int(name.split(".")[1])])

    def forward(self, tokens: torch.Tensor, state: dict | None = None,
                reset: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """tokens: (B, T) int64; reset: (B, T) bool, True at document starts -> logits (B, T, V), state.

        Without an incoming state the first token starts a segment (reset), as position 0
        does in RecurrentGemma.
        """
        reset, pos0 = self.begin(tokens, state, reset)
        layer_states = state["layers"] if state is not None else [None] * len(self.layers)
        pos = self.positions(pos0, tokens.shape[1], tokens.device)
        x = self.embed(tokens)
        new_states = []
        for i, s in enumerate(layer_states):
            x, s = self.run_layer(i, x, reset, s, pos)
            new_states.append(s)
        logits = self.logits(self.final_norm(x))
        return logits, {"pos": pos0 + tokens.shape[1], "layers": new_states}

    # The pieces of forward, also the stages of a pipeline (megarnn/parallel/pipeline.py).
    def begin(self, tokens: torch.Tensor, state: dict | None, reset: torch.Tensor | None):
        """-> (reset (B, T) bool, position of the first token).

        Without an incoming state the first token of the sequence starts a segment (reset), as
        position 0 does in RecurrentGemma. When the ops work on one chunk of a longer sequence
        (megarnn.ops.context), the chunk's first position is where it starts."""
        start = sequence_start(tokens.shape[1])
        if state is None:
            reset = torch.zeros_like(tokens, dtype=torch.bool) if reset is None else reset.clone()
            if start == 0:
                reset[:, 0] = True
        return reset, (state["pos"] if state is not None else start)

    @staticmethod
    def positions(pos0: int, length: int, device) -> torch.Tensor:
        return torch.arange(pos0, pos0 + length, device=device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, D)."""
        return self.embed_tokens(tokens) * self.embed_scale

    def run_layer(self, i: int, x: torch.Tensor, reset: torch.Tensor, s: dict | None, pos: torch.Tensor):
        """Block i: (x, state) -> (x, state), with activation checkpointing of every k-th block."""
        layer = self.layers[i]
        if self.checkpoint_every and i % self.checkpoint_every == 0 and torch.is_grad_enabled():
            # Keep only the block's input; recompute its activations in the backward pass.
            return torch.utils.checkpoint.checkpoint(layer, x, reset, s, pos, use_reentrant=False)
        return layer(x, reset, s, pos)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = nn.functional.linear(x, weight)
        cap = self.soft_cap
        return torch.tanh(logits / cap) * cap if cap > 0 else logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, state: dict | None = None,
             reset: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Decode one step: tokens (B, 1) -> logits (B, 1, V), state. Memory does not grow with time."""
        return self(tokens, state, reset)

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token loss (B, T) in float32."""
        return self.loss(logits, targets)

    def masked_loss(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                    count: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over tokens where mask is True. logits (B, T, V); targets, mask (B, T).

        count: the number of masked tokens the mean is over (default mask's). When this call
        sees one chunk of each sequence, pass the whole sequences' count: the chunks' shares,
        (sum over the chunk's tokens) / count, then add up to the mean.
        """
        ce = self.cross_entropy(logits, targets)
        m = mask.to(ce.dtype)
        count = m.sum() if count is None else count.to(ce.dtype)
        return (ce * m).sum() / count.clamp(min=1)

    def solver_stats(self) -> dict[str, float]:
        """The last forward's Newton solve per ParaRNN layer: {"newton/iters/layer_3": ...}."""
        out = {}
        for i, layer in enumerate(self.layers):
            stats = getattr(getattr(layer, "temporal_block", None), "last_stats", None)
            if stats:
                out[f"newton/iters/layer_{i}"] = float(stats["iters"])
                out[f"newton/residual/layer_{i}"] = float(stats["residual"])
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), as used for MFU.

        forward = 2 x (every weight used in a matmul, including the output head even when
        tied, the block-diagonal gates and the conv taps)
                + per layer its kind's own term (megarnn/registry.py: attention scores and
                values, SSD's chunk and state products).
        Elementwise work (gates, scan, norms) is left out, as in the PaLM / Megatron convention.
        """
        c = self.c
        matmul = sum(p.numel() for n, p in self.named_parameters()
                     if p.dim() >= 2 and "embed_tokens" not in n)
        if self.lm_head is None:  # the tied head (an untied one is among the parameters already)
            matmul += c.vocab_size * c.d_model
        extra = sum(registry.block_kind(k, c).flops(c, seq_len) for k in c.block_types())
        return 3 * (2 * matmul + extra)
