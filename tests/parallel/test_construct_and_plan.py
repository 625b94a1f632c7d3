"""Local construction and `megarnn plan`.

A rank builds only its pipeline stage's pieces, cut to its tensor-parallel shard, from the same
seeds: the shards of every rank put together equal the one-process model (checked in PyTorch's
fake process group: rank by rank in this process). `megarnn plan` builds every stage on the meta
device; its per-rank parameters equal the real build, its tensor-parallel bytes equal the
collectives counted in a real 2-rank step, and its activation bytes equal what autograd saves in
the real forward."""
import json

import pytest
import torch
import torch.multiprocessing as mp

from megarnn.config import ModelConfig, ParallelConfig
from megarnn.parallel.comm import CountBytes
from megarnn.parallel.construct import build_local
from megarnn.parallel.launch_env import free_port
from megarnn.parallel.mesh import ParallelMesh
from megarnn.parallel.tensor import merge_shards
from megarnn.plan import SavedBytes, _stage_forward, fake_world, load_plan_config, plan
from tests.conftest import ROOT, run_cli
from tests.parallel.spawn_util import run_on_ranks

SMALL = ["model.d_model=32", "model.n_layers=4", "model.vocab_size=256", "data.seq_len=32", "train.micro_batch_size=2"]


def _config(tp=1, pp=1, **model):
    c = ModelConfig(vocab_size=64, d_model=16, n_layers=4, lru_width=16, family="griffin", block_pattern="RRA",
                    n_heads=4, attention_window=5, **model)
    return c, ParallelConfig(tp=tp, pp=pp, zero_stage=1)


def _build(rank, world, tp, pp, **model):
    c, p = _config(tp, pp, **model)
    with fake_world(rank, world):
        mesh = ParallelMesh.build(tp, pp, 1)
        model_, owned, parts = build_local(c, mesh, seed=7, parallel=p)
    return model_, owned, parts


@pytest.mark.parametrize("tied", [True, False])
def test_every_layout_builds_the_one_process_weights_and_a_stage_only_its_pieces(tied):
    one, owned, _ = _build(0, 1, 1, 1, tie_embeddings=tied)
    assert owned == set(one.piece_names())
    want = dict(one.named_parameters())
    got = {}
    for rank in range(4):  # tp2 x pp2: ranks 0, 1 stage 0; ranks 2, 3 stage 1
        model, owned, parts = _build(rank, 4, 2, 2, tie_embeddings=tied)
        for name, p in model.named_parameters():
            piece = name.split(".")[0] if not name.startswith("layers.") else ".".join(name.split(".")[:2])
            assert p.is_meta == (piece not in owned), (rank, name)  # the other stage's pieces: no memory
            if not p.is_meta:
                got.setdefault(name, {})[rank % 2] = p.detach()
    assert set(got) == set(want)
    for name, parts_ in got.items():
        p = dict(model.named_parameters())[name]
        full = merge_shards([parts_[0], parts_[1]], *p.tp_split) if hasattr(p, "tp_split") else parts_[0]
        torch.testing.assert_close(full, want[name].detach(), rtol=0, atol=0, msg=name)


def test_plan_of_griffin_14b_on_512_ranks_json(tmp_path):
    proc = run_cli("plan", "configs/model/griffin-14b.yaml", "parallel.tp=8", "parallel.pp=4", "--world-size", "512",
                   "--json", timeout=300)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["world_size"] == 512
    ranks = sorted(r for e in out["ranks"] for r in e["ranks"])
    assert ranks == list(range(512))
    for e in out["ranks"]:
        assert set(e["bytes"]) >= {"weights", "grads", "optimizer", "activations", "total"}
        assert set(e["comm_bytes_per_step"]) == {"tp", "cp", "pp", "dp"}
        assert e["bytes"]["total"] <= 80e9 and e["checkpoint_bytes"] > 0
    # The stages' parameters x tp add up to the model's 14.16B, plus what is on several ranks: the
    # tied embedding (first and last stage) and what every tp rank keeps whole (norms, MQA's key /
    # value projections, row-parallel biases).
    total = sum(e["params"] for e in out["ranks"]) * 8
    assert 14.16e9 < total < 16.5e9


def _plan_config():
    return load_plan_config(str(ROOT / "configs/quickstart.yaml"), SMALL + ["parallel.tp=2", "train.precision=fp32"])


def _measure(rank, world, port, want):
    def check():
        cfg = _plan_config()
        model, owned, _ = build_local(cfg.model, ParallelMesh.build(2, 1, 1), cfg.train.seed, cfg.parallel)
        tokens = torch.randint(0, 256, (2, 32))
        with CountBytes(2) as count, SavedBytes() as saved:
            _stage_forward(model, owned, tokens, torch.float32, True, True).backward()
        assert want["params"] == sum(p.numel() for p in model.parameters())
        tp = want["comm_bytes_per_step"]["tp"]
        assert abs(count.total() - tp) <= 0.1 * tp, (count.total(), tp)
        acts = want["bytes"]["activations"]
        assert abs(saved.total - acts) <= 0.1 * acts, (saved.total, acts)
    run_on_ranks(rank, world, port, check)


@pytest.mark.timeout(300)
def test_plan_equals_a_measured_two_rank_tensor_parallel_step():
    want = plan(_plan_config(), 2)["ranks"][0]  # in PyTorch's fake process group, here
    mp.spawn(_measure, args=(2, free_port(), want), nprocs=2, join=True)


def test_materialize_builds_one_rank_and_measures_it():
    proc = run_cli("plan", "configs/quickstart.yaml", *SMALL, "parallel.tp=2", "parallel.pp=2", "--world-size", "4",
                   "--rank", "3", "--materialize", "--json", timeout=300)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    (entry,) = out["ranks"]
    assert entry["ranks"] == [3] and entry["measured_params"] == entry["params"] and entry["measured_peak_bytes"] > 0


def test_plan_with_context_parallelism_for_newton_and_scan_families():
    """The plan runs the layout's forward on meta tensors in the fake process group: the ops'
    neighbour exchanges (conv halos, Newton under cp) pass shapes through without sending."""
    for model in ("paragru-tiny", "paralstm-tiny", "paragru-block-tiny"):
        proc = run_cli("plan", f"configs/model/{model}.yaml", "parallel.cp=2", "--world-size", "4", "--json",
                       timeout=300)
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert all(e["comm_bytes_per_step"]["cp"] > 0 for e in out["ranks"]), model
