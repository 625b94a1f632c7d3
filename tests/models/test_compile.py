"""torch.compile takes the whole model: every family traces into ONE graph (fullgraph, no graph
break), with the sequence length dynamic (no recompilation for another length), and the compiled
loss and gradients equal eager. The ops' loops over time live inside custom ops (megarnn::scan_torch,
megarnn::newton_torch, ...), so dynamo sees one node per op call.

The compile backend is "aot_eager": dynamo plus AOTAutograd (fake tensors through the custom ops' fake
implementations, their registered backward in the joint graph) without Inductor's C++ codegen,
which would take minutes per family on a CPU; Inductor changes how the graph runs, not what it is.
"""
import pytest
import torch

from megarnn.config import ModelConfig
from megarnn.models import RecurrentLM

FAMILIES = {
    "griffin": dict(family="griffin", block_pattern="RRA", d_model=32, n_layers=3, n_heads=2, lru_width=32,
                    attention_window=16),
    "mamba2": dict(family="mamba2", block_pattern="M", d_model=32, n_layers=2, d_state=16, ssm_head_dim=16,
                   n_groups=1, chunk_size=16),
    "paragru": dict(family="pararnn", block_pattern="G", d_model=32, n_layers=2, n_heads=2, lru_width=32),
    "paralstm": dict(family="pararnn", block_pattern="L", d_model=32, n_layers=2, n_heads=2, lru_width=32),
    "paragru-block": dict(family="pararnn", block_pattern="B", d_model=32, n_layers=1, n_heads=2, lru_width=32,
                          newton_block_size=4),
    "gla": dict(family="gla", block_pattern="T", d_model=32, n_layers=1, n_heads=2, la_chunk_size=16, gla_gate_rank=4),
    "deltanet": dict(family="deltanet", block_pattern="D", d_model=32, n_layers=1, n_heads=2, la_chunk_size=16),
    "lru": dict(family="lru", block_pattern="U", d_model=32, n_layers=1, lru_width=32),
    "mingru": dict(family="mingru", block_pattern="N", d_model=32, n_layers=1, lru_width=32),
    "minlstm": dict(family="minlstm", block_pattern="O", d_model=32, n_layers=1, lru_width=32),
}
# The second round's families once each: torch backend, and LRU / minLSTM / GLA / Gated DeltaNet on their Triton
# kernels (custom ops). Their chunked torch forms are plain torch code with a Python loop over
# chunks, which dynamo unrolls: one graph per number of chunks (a recompile for another length).
CASES = ([(f, b) for f in ("griffin", "mamba2", "paragru", "paralstm") for b in ("torch", "triton")]
         + [(f, "torch") for f in ("paragru-block", "lru", "mingru")] + [("lru", "triton"), ("minlstm", "triton")]
         + [("gla", "triton"), ("deltanet", "triton")])


def _model(family: str, backend: str = "torch") -> RecurrentLM:
    torch.manual_seed(0)
    return RecurrentLM(ModelConfig(vocab_size=64, scan_backend=backend, **FAMILIES[family]))


def _loss(model, tokens, targets, reset):
    logits, _ = model(tokens, reset=reset)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _batch(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 64, (2, T + 1), generator=g)
    reset = torch.zeros(2, T, dtype=torch.bool)
    reset[1, T // 3] = True  # a document starts inside the sequence
    batch = [seq[:, :-1], seq[:, 1:], reset]
    for t in batch:
        torch._dynamo.mark_dynamic(t, 1)
    return batch


@pytest.mark.parametrize("family,backend", CASES)
def test_whole_model_compiles_in_one_graph_for_every_length(family, backend):
    """backend "triton" runs the kernels under Triton's interpreter on CPU (TRITON_INTERPRET=1,
    tests/conftest.py), on the GPU where there is one."""
    torch._dynamo.reset()
    model = _model(family, backend)
    loss_fn = lambda *batch: _loss(model, *batch)  # noqa: E731
    explanation = torch._dynamo.explain(loss_fn)(*_batch(48, 0))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    params = [p for p in model.parameters() if p.requires_grad]
    with torch._dynamo.config.patch(error_on_recompile=True):
        # The second length must reuse the first graph. Both are multiples of Mamba2's chunk of 16 (a
        # length that is not gets one more graph: the padded chunks are sliced back to T) and span
        # more than two chunks (sizes 0 and 1 are special to dynamo).
        for T, seed in ((48, 1), (64, 2)):
            batch = _batch(T, seed)
            got = compiled(*batch)
            got_grads = torch.autograd.grad(got, params)
            want = _loss(model, *batch)
            want_grads = torch.autograd.grad(want, params)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            for g, w in zip(got_grads, want_grads):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
