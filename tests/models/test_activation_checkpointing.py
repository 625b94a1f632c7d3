import pytest
import torch

from megarnn.config import ModelConfig
from megarnn.models import RecurrentLM


@pytest.mark.parametrize("family,pattern", [("griffin", "RRA"), ("mamba2", "M"), ("pararnn", "GL")])
@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_equal_loss_and_gradients(family, pattern, every):
    c = ModelConfig(family=family, block_pattern=pattern, vocab_size=40, d_model=16, n_layers=3, n_heads=2,
                    lru_width=16, d_state=4, ssm_head_dim=8, chunk_size=4)
    plain = RecurrentLM(c).double()
    ckpt = RecurrentLM(c).double()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.checkpoint_every = every
    tokens = torch.randint(0, 40, (2, 9))
    losses = []
    for m in (plain, ckpt):
        logits, _ = m(tokens[:, :-1])
        loss = m.cross_entropy(logits, tokens[:, 1:]).mean()
        loss.backward()
        losses.append(loss)
    assert losses[0].item() == losses[1].item()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-14, msg=lambda m: f"{n}: {m}")
