"""Tensor parallelism, without and with Megatron sequence parallelism, equals one process: loss,
every gradient, and three optimizer steps, per family.

Each spawned gloo rank builds the full model (same seed), keeps a full copy as the
one-process reference, shards the other with apply_tensor_parallel, and compares.
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megarnn.config import ModelConfig
from megarnn.errors import ConfigError
from megarnn.models import RecurrentLM
from megarnn.parallel.launch_env import free_port
from megarnn.parallel.plan import apply_sequence_parallel, apply_tensor_parallel, check_tensor_parallel
from megarnn.parallel.tensor import merge_shards
from tests.parallel.spawn_util import run_on_ranks

FAMILIES = {
    "griffin": dict(family="griffin", block_pattern="RRA", n_heads=4, attention_window=5),
    "griffin-untied-kv2": dict(family="griffin", block_pattern="RA", n_heads=4, n_kv_heads=2, tie_embeddings=False),
    "mamba2": dict(family="mamba2", block_pattern="M", d_state=8, ssm_head_dim=8, n_groups=2, chunk_size=4),
    "mamba2-g1": dict(family="mamba2", block_pattern="M", d_state=8, ssm_head_dim=8, n_groups=1, chunk_size=4),
    "paragru": dict(family="pararnn", block_pattern="G", n_heads=2),
    "paralstm": dict(family="pararnn", block_pattern="L", n_heads=2),
    "paragru-block": dict(family="pararnn", block_pattern="B", n_heads=2, newton_block_size=4),
    "paralstm-block": dict(family="pararnn", block_pattern="K", n_heads=2, newton_block_size=4),
    "gla": dict(family="gla", block_pattern="T", n_heads=2, la_chunk_size=4, gla_gate_rank=4),
    "deltanet": dict(family="deltanet", block_pattern="D", n_heads=2, la_chunk_size=4, deltanet_neg_eigval=True),
    "lru": dict(family="lru", block_pattern="U", n_heads=2),
    "mingru": dict(family="mingru", block_pattern="N", n_heads=2),
    "minlstm": dict(family="minlstm", block_pattern="O", n_heads=2),
}


def _gather_full(p, group):
    """Reassemble a sharded parameter's gradient from its tp_split record."""
    parts = [torch.empty_like(p.grad) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, p.grad.contiguous(), group=group)
    return merge_shards(parts, *p.tp_split)


def _loss(model, tokens, reset):
    logits, _ = model(tokens[:, :-1], reset=reset[:, :-1])
    return model.cross_entropy(logits, tokens[:, 1:]).mean()


def _check_family(name, group, sp):
    torch.manual_seed(0)
    c = ModelConfig(vocab_size=64, d_model=16, n_layers=3, lru_width=16, **FAMILIES[name])
    full = RecurrentLM(c).double()
    with torch.no_grad():  # away from the init so every parameter matters
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tp = apply_tensor_parallel(copy.deepcopy(full), group)
    if sp:
        apply_sequence_parallel(tp, group)
    tokens = torch.randint(0, 64, (2, 13))
    reset = torch.zeros(2, 13, dtype=torch.bool)
    reset[1, 6] = True
    ref, got = _loss(full, tokens, reset), _loss(tp, tokens, reset)
    ref.backward()
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    full_grads = dict(full.named_parameters())
    for n, p in tp.named_parameters():
        g = _gather_full(p, group) if hasattr(p, "tp_split") else p.grad
        torch.testing.assert_close(g, full_grads[n].grad, rtol=1e-9, atol=1e-11,
                                   msg=lambda m: f"{name} sp={sp}: {n}: {m}")
    # Three optimizer steps keep them together.
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (full, tp)]
    for _ in range(3):
        for opt in opts:
            opt.step()
            opt.zero_grad()
        ref, got = _loss(full, tokens, reset), _loss(tp, tokens, reset)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        ref.backward()
        got.backward()


def _check_all(names):
    for name in names:
        for sp in (False, True):
            _check_family(name, dist.group.WORLD, sp)


def _worker(rank, world, port, names):
    run_on_ranks(rank, world, port, _check_all, names)


def test_tensor_parallel_equals_one_process_for_every_family():
    mp.spawn(_worker, args=(2, free_port(), list(FAMILIES)), nprocs=2, join=True)


def test_mamba2_with_fewer_groups_than_ranks_equals_one_process_on_4_ranks():
    """n_groups = 1 and 2 on tp = 4: each group's B / C kept whole by the ranks of its heads."""
    mp.spawn(_worker, args=(4, free_port(), ["mamba2", "mamba2-g1"]), nprocs=4, join=True)


def test_sizes_that_do_not_split_are_rejected_with_numbers():
    with pytest.raises(ConfigError, match=r"parallel.tp=3 does not divide model.vocab_size=64"):
        check_tensor_parallel(ModelConfig(vocab_size=64), 3)
    with pytest.raises(ConfigError, match=r"parallel.tp=3 and model.n_groups=2"):
        check_tensor_parallel(ModelConfig(family="mamba2", block_pattern="M", vocab_size=64, n_groups=2), 3)
