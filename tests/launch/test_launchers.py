"""launch/torchrun.sh and launch/mpirun.sh start 2 gloo ranks — data parallel (ZeRO 1, 2), tensor
parallel with sequence parallelism, context parallel, or pipeline parallel — that log the losses of one
process; a tensor- or pipeline-parallel checkpoint loads as the full model."""
import subprocess

import pytest

from tests.conftest import ROOT, TINY, run_cli, run_launcher
from tests.e2e.test_quickstart import read_metrics

COMMON = [*TINY, "train.max_steps=6", "train.exit_at_step=4", "train.save_interval=4", "train.eval_interval=4",
          "data.holdout=[macbeth_gut.txt]"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    runs = {}
    for zero in (1, 2):
        runs[zero] = tmp_path_factory.mktemp(f"one{zero}")
        run_cli("train", "configs/quickstart.yaml", *COMMON, "train.micro_batch_size=8",
                f"train.out_dir={runs[zero]}", f"parallel.zero_stage={zero}")
    return runs


@pytest.mark.parametrize("script,zero,tp,cp,pp", [("torchrun.sh", 1, 1, 1, 1), ("mpirun.sh", 2, 1, 1, 1),
                                                 ("torchrun.sh", 1, 2, 1, 1), ("torchrun.sh", 2, 1, 2, 1),
                                                 ("torchrun.sh", 1, 1, 1, 2)])
def test_launcher_with_two_ranks_equals_one_process(tmp_path, one_process, script, zero, tp, cp, pp):
    run = tmp_path / "run"
    batch = 8 // (2 // (tp * cp * pp))  # the same global batch as the one-process run
    proc = run_launcher(2, "configs/quickstart.yaml", *COMMON, f"train.micro_batch_size={batch}",
                        f"train.out_dir={run}", f"parallel.zero_stage={zero}", f"parallel.tp={tp}", f"parallel.cp={cp}",
                        f"parallel.pp={pp}", f"parallel.sequence_parallel={tp > 1}", script=script, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in (run / "log.txt").read_text()
    a, b = read_metrics(one_process[zero], "train/loss"), read_metrics(run, "train/loss")
    assert sorted(b) == [1, 2, 3, 4]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5)
    assert read_metrics(run, "val/loss")[4] == pytest.approx(read_metrics(one_process[zero], "val/loss")[4], rel=1e-5)
    assert (run / "checkpoints" / "latest").read_text() == "step_000004"
    if tp > 1 or pp > 1:  # the shards merge into the full model, which matches the one-process run's
        import torch

        import megarnn
        merged, tok = megarnn.load(run)
        single, _ = megarnn.load(one_process[zero])
        tokens = torch.tensor([[tok.bos_id] + tok.encode("Fair is foul, and foul is fair")])
        torch.testing.assert_close(merged(tokens)[0], single(tokens)[0], rtol=1e-4, atol=1e-4)


def test_launcher_usage_error():
    proc = subprocess.run([str(ROOT / "launch" / "torchrun.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr
