"""Constant-memory decoding: read the prompt in one parallel pass, then one token per step."""
from __future__ import annotations

import math

import torch

from megarnn.errors import ConfigError
from megarnn.parallel.tensor import gather_from_tp


def check_sampling(max_new_tokens: int, temperature: float, top_k: int) -> None:
    """ConfigError unless max_new_tokens >= 1, temperature >= 0 (0: greedy) and top_k >= 0 (0: off)."""
    if max_new_tokens < 1:
        raise ConfigError(f"max new tokens {max_new_tokens}: must be >= 1 (e.g. --max-new-tokens 200)")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature {temperature}: must be >= 0 (0 picks the most likely token; e.g. 0.8)")
    if top_k < 0:
        raise ConfigError(f"top-k {top_k}: must be >= 0 (0 samples from the whole vocabulary; e.g. 50)")


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int = 50, seed: int = 0) -> str:
    """Sample a continuation of `prompt`; returns the prompt plus the generated text."""
    check_sampling(max_new_tokens, temperature, top_k)
    model.eval()
    device = next(model.parameters()).device
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits, state = model(torch.tensor([ids], device=device))
    out = []
    for _ in range(max_new_tokens):
        if getattr(model, "tp_group", None) is not None:  # every tensor-parallel rank samples the same token
            logits = gather_from_tp(logits, model.tp_group)
        nxt = sample(logits[0, -1].float().cpu(), temperature, top_k, gen)
        if nxt == tokenizer.eos_id:
            break
        out.append(nxt)
        logits, state = model.step(torch.tensor([[nxt]], device=device), state)
    return prompt + tokenizer.decode(out)


def sample(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    """logits: (V,) -> one token id. temperature 0 is greedy."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
