"""A user's cell from a module outside megarnn (examples/mingru.py, the README's example), named in
the config as model.mixer, gets every layout with no change to megarnn: tp2 x cp2 with sequence
parallelism equals one process (loss and every gradient), and `megarnn train` under torchrun with
pipeline / tensor parallelism logs the one-process losses, resumes, exports and loads."""
import os

import pytest
import torch.multiprocessing as mp

from megarnn.parallel.launch_env import free_port
from tests.conftest import ROOT, TINY, run_cli, run_launcher
from tests.e2e.test_quickstart import read_metrics

EXAMPLES = str(ROOT / "examples")
MINGRU = dict(family="griffin", block_pattern="XXA", mixer="mingru:MinGRU", n_heads=4, attention_window=5)
PLUGIN = ["model.block_pattern=XXA", "model.mixer=mingru:MinGRU"]
COMMON = [*TINY, *PLUGIN, "train.save_interval=4", "train.eval_interval=4", "data.holdout=[macbeth_gut.txt]",
          "train.warmup_steps=2", "train.max_steps=6", "train.micro_batch_size=8"]


@pytest.fixture(autouse=True)
def _user_module_on_path(monkeypatch):
    """The user's module is importable the way a user makes it so: PYTHONPATH (spawned ranks too)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([EXAMPLES, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(EXAMPLES)


def _worker(rank, world, port, tp, cp, sp):
    from tests.parallel import test_layouts
    from tests.parallel.spawn_util import run_on_ranks
    from tests.parallel.test_tensor_parallel import FAMILIES
    from megarnn.parallel.mesh import ParallelMesh

    FAMILIES["mingru"] = MINGRU
    run_on_ranks(rank, world, port, lambda: test_layouts._check("mingru", ParallelMesh.build(tp=tp, cp=cp), sp))


@pytest.mark.timeout(300)
def test_user_cell_tensor_context_sequence_parallel_equals_one_process():
    mp.spawn(_worker, args=(4, free_port(), 2, 2, True), nprocs=4, join=True)


@pytest.mark.timeout(600)
def test_user_cell_trains_under_pipeline_and_tensor_parallelism_resumes_and_exports(tmp_path):
    one = tmp_path / "one"
    run_cli("train", "configs/quickstart.yaml", *COMMON, "train.exit_at_step=4", f"train.out_dir={one}", env={"PYTHONPATH": EXAMPLES})
    want = read_metrics(one, "train/loss")
    for layout in (["parallel.pp=2"], ["parallel.tp=2", "parallel.sequence_parallel=true"]):
        run = tmp_path / layout[0].replace("=", "")
        run_launcher(2, "configs/quickstart.yaml", *COMMON, "train.exit_at_step=4", f"train.out_dir={run}", *layout)
        got = read_metrics(run, "train/loss")
        assert sorted(got) == [1, 2, 3, 4]
        for s in want:
            assert got[s] == pytest.approx(want[s], rel=1e-5), (layout, s)
    # Resume the pipeline run two more steps, then export it and load the export.
    run = tmp_path / "parallel.pp2"
    run_launcher(2, "configs/quickstart.yaml", *COMMON, f"train.out_dir={run}", "parallel.pp=2", "train.resume=auto")
    assert sorted(read_metrics(run, "train/loss")) == [1, 2, 3, 4, 5, 6]
    out = tmp_path / "export"
    run_cli("export", run, out, "--format", "safetensors", env={"PYTHONPATH": EXAMPLES})
    proc = run_cli("generate", out, "--prompt", "KING.", "--max-new-tokens", "5", env={"PYTHONPATH": EXAMPLES})
    assert proc.stdout.strip()
