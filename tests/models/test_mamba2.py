import torch

from megarnn.config import ModelConfig
from megarnn.models import RecurrentLM


def _model(chunk=8):
    c = ModelConfig(family="mamba2", block_pattern="M", vocab_size=97, d_model=32, n_layers=2, d_state=8,
                    ssm_head_dim=16, n_groups=2, chunk_size=chunk)
    return RecurrentLM(c).double()


def test_step_equals_parallel_with_resets():
    m = _model()
    x = torch.randint(0, 97, (2, 21))
    reset = torch.zeros(2, 21, dtype=torch.bool)
    reset[0, 7] = True
    reset[1, 15] = True
    full, _ = m(x, reset=reset)
    state, outs = None, []
    for t in range(21):
        logits, state = m.step(x[:, t:t + 1], state, reset[:, t:t + 1])
        outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert state["layers"][0]["ssm"].shape == (2, 4, 16, 8)  # (B, H, P, N): constant memory


def test_packed_documents_equal_separate_documents():
    m = _model()
    d1, d2 = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 6))
    reset = torch.zeros(1, 17, dtype=torch.bool)
    reset[0, 11] = True
    packed, _ = m(torch.cat([d1, d2], 1), reset=reset)
    torch.testing.assert_close(packed[:, :11], m(d1)[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(packed[:, 11:], m(d2)[0], rtol=1e-10, atol=1e-10)


def test_gradients_reach_every_parameter():
    m = _model()
    m(torch.randint(0, 97, (2, 12)))[0].sum().backward()
    assert not [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
