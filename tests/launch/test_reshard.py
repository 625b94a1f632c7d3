"""Resuming on another layout (megarnn/train/reshard.py): one run moves every two steps between
tensor-parallel, pipeline and data-parallel sizes and ZeRO stages, and its losses continue as the
uninterrupted one-process run's; after a reshard the Adam moments are the one-process run's
at that step (carried, not reset); ZeRO-3 refuses another layout."""

import pytest
import torch

from megarnn.parallel.launch_env import free_port
from tests.conftest import ROOT, TINY, run_cli, run_launcher
from tests.e2e.test_quickstart import read_metrics
from tests.parallel.spawn_util import run_on_ranks

STEPS = 18
COMMON = [*TINY, f"train.max_steps={STEPS}", "train.save_interval=2", "train.eval_interval=1000", "data.holdout=[]"]
# (processes, settings) of each leg of the moved run; every leg trains 2 steps on the global batch of 8.
LEGS = [
    (2, ["parallel.tp=2", "parallel.zero_stage=0", "train.micro_batch_size=8"]),  # fresh start
    (1, ["parallel.zero_stage=1", "train.micro_batch_size=8"]),  # tp2 -> tp1, ZeRO-0 -> 1
    (2, ["parallel.tp=2", "parallel.zero_stage=1", "train.micro_batch_size=8"]),  # tp1 -> tp2
    (2, ["parallel.pp=2", "parallel.zero_stage=1", "train.micro_batch_size=8"]),  # tp2 -> pp2
    (4, ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=0", "train.micro_batch_size=8"]),  # -> tp2 x pp2
    (2, ["parallel.zero_stage=1", "train.micro_batch_size=4"]),  # tp2 x pp2 -> dp2
    (4, ["parallel.zero_stage=1", "train.micro_batch_size=2"]),  # dp2 -> dp4 under ZeRO-1
    (2, ["parallel.zero_stage=2", "train.micro_batch_size=4"]),  # dp4 ZeRO-1 -> dp2 ZeRO-2
    (1, ["parallel.zero_stage=0", "train.micro_batch_size=8"]),  # ZeRO-2 dp2 -> one process, ZeRO-0
]


def _train(nproc, *args):
    if nproc == 1:
        return run_cli("train", "configs/quickstart.yaml", *COMMON, *args, env={"OMP_NUM_THREADS": "1"})
    return run_launcher(nproc, "configs/quickstart.yaml", *COMMON, *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the uninterrupted one-process ZeRO-1 run, the run moved across LEGS)."""
    straight, moved = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("moved")
    _train(1, "parallel.zero_stage=1", "train.micro_batch_size=8", f"train.out_dir={straight}")
    for i, (nproc, settings) in enumerate(LEGS):
        _train(nproc, *settings, f"train.out_dir={moved}", f"train.exit_at_step={2 * (i + 1)}")
    return straight, moved


def test_losses_continue_across_tp_dp_and_zero_changes(runs):
    straight, moved = runs
    log = (moved / "log.txt").read_text()
    for step in range(2, STEPS, 2):
        assert f"checkpoints/step_{step:06d} at step {step}" in log  # every leg resumed
    a, b = read_metrics(straight, "train/loss"), read_metrics(moved, "train/loss")
    assert sorted(b) == list(range(1, STEPS + 1))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), s


def _reference(straight, step):
    """The one-process run's full state at `step`; its weights checked against DeepSpeed's own reader."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megarnn.train.reshard import read_full_state
    full = read_full_state(straight / "checkpoints", f"step_{step:06d}")
    ds = get_fp32_state_dict_from_zero_checkpoint(str(straight / "checkpoints"), tag=f"step_{step:06d}")
    assert ds.keys() == full.model.keys()
    for n, t in ds.items():
        assert torch.equal(t, full.model[n]), n
    assert full.optim_step == step and full.global_steps == step
    return full


def _compare(jobs):
    """On each rank: build the trainer's engine for each job's layout, load the checkpoint into
    it (a reshard) and compare the Adam moments with the reference's slices."""
    import deepspeed
    import yaml

    from megarnn.config import Config
    from megarnn.models import RecurrentLM
    from megarnn.parallel.mesh import ParallelMesh
    from megarnn.parallel.plan import apply_tensor_parallel
    from megarnn.parallel.tensor import shard
    from megarnn.train import checkpoint
    from megarnn.train.engine import build_engine, setup_distributed

    setup_distributed()
    for ckpt, tp, zero, precision, ref in jobs:
        cfg = Config.from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
        cfg.parallel.tp, cfg.parallel.zero_stage, cfg.train.precision = tp, zero, precision
        mesh = ParallelMesh.build(tp, 1, 1)
        torch.manual_seed(1)  # other initial weights than the run's: the load must replace them
        model = RecurrentLM(cfg.model)
        if tp > 1:
            apply_tensor_parallel(model, mesh.group("tp"))
        engine = build_engine(cfg, model, mesh)
        assert not checkpoint.check_layout(checkpoint.read_meta(ckpt.parent, ckpt.name), cfg, mesh.dp, ckpt)
        client = checkpoint.load(engine, cfg, ckpt, mesh.dp)
        assert client["step"] == ref.optim_step and engine.global_steps == ref.global_steps
        assert engine.lr_scheduler.last_epoch == ref.lr_scheduler["last_epoch"]
        assert engine.get_lr() == ref.lr_scheduler["_last_lr"]
        if zero > 0:  # DeepSpeed links its per-parameter views of Adam's state after a step; link them now
            engine.optimizer._lazy_init_hp_params_optimizer_state()
        adam, master = engine.optimizer, {}
        if precision == "bf16" and zero == 0:  # DeepSpeed's wrapper steps ours on fp32 copies
            adam = engine.optimizer.optimizer
            master = {p: m for ps, ms in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups)
                      for p, m in zip(ps, ms)}
        for name, p in engine.module.named_parameters():
            def mine(t):
                return shard(t, *p.tp_split, mesh.rank_in("tp"), tp) if hasattr(p, "tp_split") else t
            if zero == 0:
                state = adam.state[master.get(p, p)]
                got = {k: state[k] for k in ("exp_avg", "exp_avg_sq")}
                assert int(state["step"]) == ref.optim_step
                weight = master.get(p, p).detach()
            else:  # gathered over the dp ranks by DeepSpeed
                got = {k: deepspeed.utils.safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
                weight = deepspeed.utils.safe_get_full_fp32_param(p)
            assert mine(ref.exp_avg[name]).abs().sum() > 0, name
            for k, t in got.items():  # the runs' float rounding differs: errors relative to the tensor's scale
                want = mine(getattr(ref, k)[name])
                torch.testing.assert_close(t, want, rtol=1e-4, atol=1e-5 * want.abs().max().item(),
                                           msg=lambda m, name=name, k=k: f"{name} {k} (ZeRO-{zero}, tp{tp}): {m}")
            want = mine(ref.model[name])
            torch.testing.assert_close(weight, want, rtol=1e-4, atol=1e-5 * want.abs().max().item(),
                                       msg=lambda m, name=name: f"{name} weight (ZeRO-{zero}, tp{tp}): {m}")


def _load_and_compare(rank, world, port, jobs):
    run_on_ranks(rank, world, port, _compare, jobs)


def test_optimizer_state_after_reshard_equals_one_process_run(runs):
    straight, moved = runs
    import torch.multiprocessing as mp
    step4, step6 = _reference(straight, 4), _reference(straight, 6)
    jobs = [  # (checkpoint, new layout: tp, ZeRO stage, precision; the one-process run at that step)
        (moved / "checkpoints" / "step_000004", 2, 0, "fp32", step4),  # 1 process ZeRO-1 -> tp2 ZeRO-0
        (moved / "checkpoints" / "step_000004", 2, 0, "bf16", step4),  # ... in bf16: fp32 master copies
        (moved / "checkpoints" / "step_000006", 1, 2, "fp32", step6),  # tp2 ZeRO-1 -> dp2 ZeRO-2
    ]
    mp.spawn(_load_and_compare, args=(2, free_port(), jobs), nprocs=2, join=True)


def test_zero3_refuses_another_layout(tmp_path):
    from megarnn.config import load_config
    from megarnn.errors import CheckpointError
    from megarnn.train.checkpoint import check_layout

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["parallel.zero_stage=3"])
    meta = {"parallel": {"tp": 1, "pp": 1, "zero_stage": 3},
            "layout": {"dp": 2, "pp": 1, "cp": 1, "tp": 1, "zero_stage": 3}}
    assert check_layout(meta, cfg, 2, tmp_path)  # the same layout: DeepSpeed loads it
    with pytest.raises(CheckpointError, match="ZeRO-3 partitions the weights themselves and cannot be resharded: "
                                              "resume with parallel.tp=1, pp=1, zero_stage=3 on 2 data x context"):
        check_layout(meta, cfg, 1, tmp_path)
    cfg.parallel.zero_stage = 1  # nor can a ZeRO-3 checkpoint become a ZeRO-1 one
    with pytest.raises(CheckpointError, match="zero_stage=3 on 2 data x context parallel ranks and this run has "
                                              "parallel.tp=1, pp=1, zero_stage=1 on 2"):
        check_layout(meta, cfg, 2, tmp_path)


def test_mamba2_component_cuts_survive_tp_and_pp_changes(tmp_path):
    """Mamba2's in_proj / conv are cut per component (z, x, B, C, dt: heads and groups), where a
    plain row split would scramble them: tp2 -> pp2 -> one process continues the one-process run."""
    mamba = ["model=configs/model/mamba2-tiny.yaml", "model.n_groups=2", "train.max_steps=6", "train.micro_batch_size=8"]
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    _train(1, *mamba, f"train.out_dir={straight}")
    _train(2, *mamba, "parallel.tp=2", f"train.out_dir={moved}", "train.exit_at_step=2")
    _train(2, *mamba, "parallel.pp=2", f"train.out_dir={moved}", "train.exit_at_step=4")
    _train(1, *mamba, f"train.out_dir={moved}")
    a, b = read_metrics(straight, "train/loss"), read_metrics(moved, "train/loss")
    assert sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), s
