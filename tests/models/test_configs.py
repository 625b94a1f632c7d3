"""Every shipped model config builds, and the sized ones have the parameter count their name says.

Names count all parameters (Mamba2, ParaRNN) or, as Gemma / Griffin do with their 256k
vocabulary, the parameters without the embedding.
"""
import re
from pathlib import Path

import pytest
import torch

from megarnn.config import ModelConfig
from megarnn.models import RecurrentLM

CONFIGS = sorted(Path("configs/model").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_model_config_builds_and_matches_its_name(path):
    c = ModelConfig.from_yaml(path)
    if c.vocab_size == 0:
        c.vocab_size = 512  # tiny / small configs take it from the tokenizer
    with torch.device("meta"):
        model = RecurrentLM(c)
    assert model.flops_per_token(2048) > 6 * model.num_params() - 6 * model.embed_tokens.weight.numel()
    size = re.search(r"-(\d+(?:\.\d+)?)([mb])$", path.stem)
    if size:
        expected = float(size[1]) * (1e6 if size[2] == "m" else 1e9)
        total = model.num_params()
        counts = (total, total - model.embed_tokens.weight.numel())
        assert any(abs(n / expected - 1) < 0.12 for n in counts), (path.stem, counts)
