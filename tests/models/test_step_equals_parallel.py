"""Step-by-step decoding equals the parallel form for every family, over 70 tokens with
document resets inside, in float32 (max error <= 1e-5 relative to the largest logit)."""
import pytest
import torch

from megarnn.config import ModelConfig
from megarnn.models import RecurrentLM

FAMILIES = {
    "hawk": dict(family="hawk", block_pattern="R"),
    "griffin": dict(family="griffin", block_pattern="RRA", attention_window=16),
    "mamba2": dict(family="mamba2", block_pattern="M", d_state=16, ssm_head_dim=16, n_groups=2, chunk_size=16),
    "paragru": dict(family="pararnn", block_pattern="G"),
    "paralstm": dict(family="pararnn", block_pattern="L"),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_step_equals_parallel_over_70_tokens_with_resets_in_float32(name):
    torch.manual_seed(0)
    m = RecurrentLM(ModelConfig(vocab_size=100, d_model=32, n_layers=3, n_heads=2, lru_width=32, **FAMILIES[name]))
    T = 70
    tokens = torch.randint(0, 100, (2, T))
    reset = torch.zeros(2, T, dtype=torch.bool)
    reset[0, [17, 50]] = True
    reset[1, 33] = True
    with torch.no_grad():
        full, _ = m(tokens, reset=reset)
        state, steps = None, []
        for t in range(T):
            logits, state = m.step(tokens[:, t:t + 1], state, reset[:, t:t + 1])
            steps.append(logits)
    err = (torch.cat(steps, 1) - full).abs().max() / full.abs().max()
    assert err <= 1e-5, err
