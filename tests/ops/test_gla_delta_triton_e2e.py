"""The GLA and gated-delta-rule Triton kernels end to end: context parallelism on 2 ranks with
backend="triton" equals the one-process reference (both ops in one spawn: the op runs its chunk
with the kernels, the carry from earlier ranks is added in torch), and the gla / deltanet model
families train a step with the kernels (they launch, and the loss, gradients and updated weights
equal the torch backend's: model.scan_backend reaches the ops).
"""
import pytest
import torch
import torch.multiprocessing as mp

from megarnn.config import ModelConfig
from megarnn.models import RecurrentLM
from megarnn.parallel.launch_env import free_port
from tests.ops import test_delta_rule, test_gla
from tests.parallel.spawn_util import run_on_ranks
from tests.parallel.test_tensor_parallel import FAMILIES


def _check_cp_triton():
    test_gla._check_cp("triton")
    test_delta_rule._check_cp("triton")


def _worker(rank, world, port):
    run_on_ranks(rank, world, port, _check_cp_triton)


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo ranks on CPU tensors")
def test_context_parallel_on_2_ranks_with_triton_equals_one_process():
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)


def _count_launches(monkeypatch) -> set:
    """The names of the interpreted kernels launched from now on (CPU, under the interpreter)."""
    from triton.runtime.interpreter import InterpretedFunction
    names, run = set(), InterpretedFunction.run

    def counting(self, *args, **kwargs):
        names.add(self.fn.__name__)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting)
    return names


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts launches under Triton's interpreter")
@pytest.mark.parametrize("family", ["gla", "deltanet"])
def test_model_trains_a_step_with_the_kernels(family, monkeypatch):
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=64, d_model=16, n_layers=1, **FAMILIES[family])
    models = {b: RecurrentLM(ModelConfig(**{**c.__dict__, "scan_backend": b})) for b in ("torch", "triton")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    tokens = torch.randint(0, 64, (2, 18))
    reset = torch.zeros(2, 18, dtype=torch.bool)
    reset[0, 9] = True
    losses = {}
    launches = _count_launches(monkeypatch)
    for b, model in models.items():
        launches.clear()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        logits, _ = model(tokens[:, :-1], reset=reset[:, :-1])
        loss = model.cross_entropy(logits, tokens[:, 1:]).mean()
        loss.backward()
        opt.step()
        losses[b] = loss.detach()
        launched = {name for name in launches if name.startswith(("_gla", "_delta"))}
        assert bool(launched) == (b == "triton"), f"{b}: launched {launches}"
    assert torch.isfinite(losses["triton"])
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(models["triton"].named_parameters(), models["torch"].parameters()):
        # relative to the largest entry: fp32 rounding of two chunked forms
        err = ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item()
        assert err <= 1e-4, f"d{name}: relative error {err:.1e}"
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")  # lr 0.1
