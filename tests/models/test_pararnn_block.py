"""The block-diagonal paraGRU and paraLSTM families (block letters "B" and "K", megarnn.models.pararnn
BlockGRUCell and BlockLSTMCell) as models:
step-by-step decoding equals the parallel form (fp64 <= 1e-10, fp32 <= 1e-5) over tokens with
document resets; the default (Newton / torch) model equals the reference-loop model with every
gradient (fp64); flops_per_token equals FlopCounterMode's count of a forward within 5%; config
validation of newton_block_size; the shipped configs build. TP / SP / CP / PP parity: the families
"paragru-block" and "paralstm-block" in tests/parallel/test_tensor_parallel.py FAMILIES."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megarnn.config import ModelConfig
from megarnn.errors import ConfigError
from megarnn.models import RecurrentLM
from tests.conftest import ROOT

FAMILY = dict(family="pararnn", block_pattern="B", n_heads=2, newton_block_size=4)
LETTERS = ["B", "K"]


def _model(dtype, letter="B", **kw):
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=50, d_model=16, n_layers=2, lru_width=16, **{**FAMILY, "block_pattern": letter, **kw})
    c.validate()
    m = RecurrentLM(c).to(dtype)
    with torch.no_grad():  # stronger recurrent coupling than at init, so the blocks matter
        for name, p in m.named_parameters():
            if name.endswith("cell.recurrent"):
                p.mul_(3)
    return m


@pytest.mark.parametrize("letter", LETTERS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_step_equals_parallel_with_resets(dtype, tol, letter):
    m = _model(dtype, letter)
    T = 30
    tokens = torch.randint(0, 50, (2, T))
    reset = torch.zeros(2, T, dtype=torch.bool)
    reset[0, [7, 20]] = True
    reset[1, 13] = True
    with torch.no_grad():
        full, _ = m(tokens, reset=reset)
        state, steps = None, []
        for t in range(T):
            logits, state = m.step(tokens[:, t:t + 1], state, reset[:, t:t + 1])
            steps.append(logits)
    err = ((torch.cat(steps, 1) - full).abs().max() / full.abs().max()).item()
    assert err <= tol, err


@pytest.mark.parametrize("letter", LETTERS)
def test_newton_model_equals_the_reference_loop_model_with_gradients(letter):
    tokens = torch.randint(0, 50, (2, 21))
    reset = torch.zeros(2, 21, dtype=torch.bool)
    reset[1, 9] = True
    out = {}
    for backend in ("reference", "torch"):
        m = _model(torch.float64, letter, scan_backend=backend, newton_max_iters=30)
        for block in m.modules():  # force Newton (the torch backend picks the sequential forward on CPU)
            if hasattr(block, "solve_kwargs") and backend == "torch":
                block.solve_kwargs["backend"] = "torch_newton"
        logits, _ = m(tokens[:, :-1], reset=reset[:, :-1])
        loss = m.cross_entropy(logits, tokens[:, 1:]).mean()
        loss.backward()
        out[backend] = (logits, {n: p.grad for n, p in m.named_parameters()})
        if backend == "torch":
            stats = [b.last_stats for b in m.modules() if hasattr(b, "last_stats")]
            assert stats and all(s["converged"] and not s["fallback"] and s["iters"] >= 2 for s in stats), stats
    torch.testing.assert_close(out["torch"][0], out["reference"][0], rtol=1e-10, atol=1e-10)
    for name, g in out["reference"][1].items():
        torch.testing.assert_close(out["torch"][1][name], g, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("letter", LETTERS)
def test_flops_per_token_equal_the_flop_counter(letter):
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=512, d_model=128, n_layers=3, **{**FAMILY, "n_heads": 4, "newton_block_size": 8,
                                                               "block_pattern": letter})
    model = RecurrentLM(c)
    B, T = 2, 64
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 512, (B, T)))
    counted = counter.get_total_flops() / (B * T)
    want = model.flops_per_token(T) / 3  # training = 3 x forward
    assert abs(counted - want) <= 0.05 * want, (counted, want)


def test_block_size_is_validated():
    ok = dict(vocab_size=50, d_model=32, lru_width=32, **FAMILY)
    ModelConfig(**ok).validate()
    with pytest.raises(ConfigError, match="newton_block_size=17 must be within 2..16"):
        ModelConfig(**{**ok, "newton_block_size": 17}).validate()
    with pytest.raises(ConfigError, match="must be divisible by model.newton_block_size=3"):
        ModelConfig(**{**ok, "newton_block_size": 3}).validate()
    with pytest.raises(ConfigError, match="newton_block_size=16 must be within 2..8"):
        ModelConfig(**{**ok, "block_pattern": "K", "newton_block_size": 16}).validate()


def test_shipped_configs_validate():
    for name in ("paragru-block-tiny", "paragru-block-1b", "paralstm-block-tiny", "paralstm-block-1b"):
        c = ModelConfig.from_yaml(ROOT / "configs" / "model" / f"{name}.yaml")
        c.validate()
        assert c.block_pattern in LETTERS and 2 <= c.newton_block_size <= 16
