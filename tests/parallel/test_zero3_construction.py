"""ZeRO-3 partitions at construction: each piece is handed to deepspeed.zero.Init as soon as it
is built (and cut to its tensor-parallel shard), so a rank never holds its whole shard, and the
partitioned weights are exactly the ones local construction builds without ZeRO-3."""
import deepspeed
import pytest
import torch
import torch.multiprocessing as mp

from megarnn.config import load_config
from megarnn.parallel.construct import build_local
from megarnn.parallel.launch_env import free_port
from megarnn.train.loop import build_model, start_processes
from tests.conftest import ROOT
from tests.parallel.spawn_util import run_on_ranks


def _check(tp: int):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      ["model=configs/model/griffin-tiny.yaml", "data.vocab_size=512", "parallel.zero_stage=3",
                       f"parallel.tp={tp}", "model.vocab_size=512"])
    _, world, mesh, device = start_processes(cfg)
    model, _, engine, n_params, _ = build_model(cfg, mesh, device)
    plain, _, _ = build_local(cfg.model, mesh, cfg.train.seed, cfg.parallel)
    params = dict(model.named_parameters())
    assert params and all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in params.values())
    held = sum(p.ds_tensor.numel() for p in params.values())
    shard = sum(p.numel() for p in plain.parameters())
    assert shard / mesh.dp <= held <= shard / mesh.dp + 64 * len(params), (held, shard)  # + DeepSpeed's padding
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in plain.named_parameters():
            assert torch.equal(params[name].detach(), p.detach()), name


def _run(rank, world, port, tp):
    run_on_ranks(rank, world, port, _check, tp)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp,world", [(1, 2), (2, 4)])
def test_zero3_partitions_each_piece_at_construction(tp, world):
    mp.spawn(_run, args=(world, free_port(), tp), nprocs=world, join=True)
