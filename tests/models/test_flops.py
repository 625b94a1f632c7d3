"""RecurrentLM.flops_per_token (the block registry's FLOPs, as MFU uses them) equals what
torch.utils.flop_counter.FlopCounterMode counts in a forward pass, within 5%, for every family,
tied and untied (an untied head is counted once)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megarnn.config import ModelConfig
from megarnn.models import RecurrentLM

FAMILIES = {
    "hawk": dict(family="hawk", block_pattern="R", n_heads=4),
    "griffin": dict(family="griffin", block_pattern="RRA", n_heads=4, attention_window=64),
    "mamba2": dict(family="mamba2", block_pattern="M", d_state=16, ssm_head_dim=16, n_groups=1, chunk_size=16),
    "paragru": dict(family="pararnn", block_pattern="G", n_heads=4),
    "paralstm": dict(family="pararnn", block_pattern="L", n_heads=4),
}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_flops_per_token_equal_the_flop_counter(name, tied):
    torch.manual_seed(0)
    model = RecurrentLM(ModelConfig(vocab_size=512, d_model=128, n_layers=3, tie_embeddings=tied, **FAMILIES[name]))
    B, T = 2, 64
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 512, (B, T)))
    counted = counter.get_total_flops() / (B * T)
    want = model.flops_per_token(T) / 3  # training = 3 x forward
    assert abs(counted - want) <= 0.05 * want, (counted, want)
