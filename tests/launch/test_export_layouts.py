"""`megarnn export` from sharded checkpoints: a tp2 x pp2 run (4 gloo ranks, ZeRO-1; DeepSpeed's
pipeline engine takes ZeRO 0-1), a tp2 x dp2 ZeRO-2 run and a tp2 x dp2 ZeRO-3 run export the
same weights as the equivalent one-process run; tools/inspect_checkpoint.py lists the sharded
checkpoint."""
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, TINY, run_cli, run_launcher
from tests.e2e.test_quickstart import read_metrics

COMMON = [*TINY, "model.n_layers=4", "train.max_steps=6", "train.exit_at_step=3", "train.save_interval=3", "train.eval_interval=100",
          "data.holdout=[]"]


def _torchrun(nproc, *args):
    run_launcher(nproc, "configs/quickstart.yaml", *COMMON, *args)


@pytest.mark.parametrize("layout,zero,batch", [(["parallel.tp=2", "parallel.pp=2"], 1, 8),
                                               (["parallel.tp=2"], 2, 4), (["parallel.tp=2"], 3, 4)])
def test_export_of_sharded_checkpoint_equals_one_process_export(tmp_path, layout, zero, batch):
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    run_cli("train", "configs/quickstart.yaml", *COMMON, "train.micro_batch_size=8", f"parallel.zero_stage={zero}",
            f"train.out_dir={one}")
    _torchrun(4, *layout, f"train.micro_batch_size={batch}", f"parallel.zero_stage={zero}", f"train.out_dir={sharded}")
    a, b = read_metrics(one, "train/loss"), read_metrics(sharded, "train/loss")
    assert all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a)
    for run in (one, sharded):
        run_cli("export", run, run / "export")
    want, got = load_file(str(one / "export" / "model.safetensors")), load_file(str(sharded / "export" / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for name in want:  # the runs' sums differ in order only: within float32 noise after three Adam steps
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")

    listing = subprocess.run([sys.executable, str(ROOT / "tools" / "inspect_checkpoint.py"), str(sharded), "--tensors",
                              "--verify"], capture_output=True, text=True, check=True).stdout
    assert "step        3" in listing and "tp=2" in listing and f"ZeRO-{zero}" in listing
    assert "embed_tokens.weight" in listing and "(verified)" in listing
    if "parallel.pp=2" in layout:
        assert "layer_05-model_01-model_states.pt" in listing
