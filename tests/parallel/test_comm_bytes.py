"""Bytes on the wire of one tensor-parallel training step (forward + backward), counted by wrapping
every torch.distributed collective: sequence parallelism moves no more activation bytes than plain
tensor parallelism (its only extra is O(D) per norm and bias: their gradients), and both equal the
closed form of megarnn/parallel/comm.py within 5%, for every family."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megarnn.config import ModelConfig
from megarnn.models import RecurrentLM
from megarnn.parallel.comm import CountBytes, tp_bytes_per_micro_batch
from megarnn.parallel.launch_env import free_port
from megarnn.parallel.mesh import ParallelMesh
from megarnn.parallel.plan import apply_sequence_parallel, apply_tensor_parallel
from tests.parallel.spawn_util import run_on_ranks

B, T = 2, 32
FAMILIES = {
    "griffin": dict(family="griffin", block_pattern="RRA", n_heads=4, attention_window=8),
    "mamba2": dict(family="mamba2", block_pattern="M", d_state=8, ssm_head_dim=8, n_groups=2, chunk_size=8),
    "paragru": dict(family="pararnn", block_pattern="G", n_heads=2),
}


def _step_bytes(name: str, sp: bool) -> tuple[float, dict]:
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=64, d_model=16, n_layers=3, lru_width=16, **FAMILIES[name])
    model = RecurrentLM(c)
    mesh = ParallelMesh.build(tp=2)
    apply_tensor_parallel(model, mesh.group("tp"))
    if sp:
        apply_sequence_parallel(model, mesh.group("tp"))
    tokens = torch.randint(0, 64, (B, T + 1))
    with CountBytes(2) as count:
        logits, _ = model(tokens[:, :-1])
        model.masked_loss(logits, tokens[:, 1:], torch.ones(B, T, dtype=torch.bool)).backward()
    want = tp_bytes_per_micro_batch(model.c, B, T, tp=2, sequence_parallel=sp, act_bytes=4)
    return count.total(), want


def _check():
    for name in FAMILIES:
        tp, tp_want = _step_bytes(name, sp=False)
        sp, sp_want = _step_bytes(name, sp=True)
        for got, want, what in [(tp, tp_want, "TP"), (sp, sp_want, "TP+SP")]:
            assert abs(got - want["total"]) <= 0.05 * want["total"], f"{name} {what}: {got} bytes, closed form {want}"
        # Sequence parallelism moves the same activation bytes; its only extra are O(D) gradients.
        assert sp <= tp + sp_want["params"] - tp_want["params"], (name, tp, sp)
        assert sp_want["activations"] <= tp_want["activations"]


def _worker(rank, world, port):
    run_on_ranks(rank, world, port, _check)


@pytest.mark.timeout(300)
def test_sequence_parallel_moves_no_more_than_tensor_parallel_and_both_equal_the_closed_form():
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
