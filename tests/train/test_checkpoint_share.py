"""Checkpoints whose cost per rank stays flat as ranks grow (megarnn/train/checkpoint.py): every
rank hashes the files it wrote and rank 0 gathers the lists into megarnn.json; on resume a rank
hashes only the files it reads and all ranks agree, walking back together past a checkpoint
whose file is corrupt on one rank only."""
import json

import pytest

from megarnn.train import checkpoint
from megarnn.train.ds_checkpoint import rank_files, share_of, source_files
from tests.conftest import TINY, run_launcher
from tests.e2e.test_quickstart import read_metrics

COMMON = ["configs/quickstart.yaml", *TINY, "train.save_interval=2", "train.eval_interval=100",
          "data.holdout=[]", "parallel.zero_stage=1", "train.micro_batch_size=2", "train.max_steps=6"]


def _meta(tp=2, pp=1, dp=2):
    files = {f"mp_rank_{r:02d}_model_states.pt": {"size": 100, "sha256": ""} for r in range(tp * pp)}
    files.update({f"bf16_zero_pp_rank_{d}_mp_rank_{r:02d}_optim_states.pt": {"size": 1000 + d, "sha256": ""}
                  for d in range(dp) for r in range(tp * pp)})
    files.update({f"layer_{i:02d}-model_{t:02d}-model_states.pt": {"size": 10, "sha256": ""}
                  for i in range(4) for t in range(tp)} if pp > 1 else {})
    files.update({"config.yaml": {"size": 5, "sha256": ""}, "tokenizer/tokenizer.model": {"size": 7, "sha256": ""}})
    return {"layout": {"tp": tp, "pp": pp, "dp": dp, "cp": 1, "zero_stage": 1}, "files": files}


def test_rank_files_are_the_ranks_own():
    meta = _meta(tp=2, pp=2, dp=2)
    assert rank_files(meta, stage=1, tp_rank=0, dp_rank=1, layers=range(2, 4)) == [
        "mp_rank_02_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_02_optim_states.pt",
        "layer_02-model_00-model_states.pt", "layer_03-model_00-model_states.pt"]
    assert rank_files(_meta(), 0, 1, 0) == ["mp_rank_01_model_states.pt",
                                             "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt"]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_a_reshard_splits_the_source_files_over_the_ranks(world):
    meta = _meta(tp=2, pp=2, dp=2)
    shares = [share_of(meta["files"], source_files(meta), r, world) for r in range(world)]
    every = sorted(f for s in shares for f in s)
    assert every == source_files(meta) and "config.yaml" not in every  # each once, all of them
    load = [sum(meta["files"][f]["size"] for f in s) for s in shares]
    assert max(load) - min(load) <= max(f["size"] for f in meta["files"].values())


def test_two_ranks_save_a_complete_manifest_and_walk_back_together(tmp_path):
    run = tmp_path / "run"
    run_launcher(2, *COMMON, f"train.out_dir={run}", "train.exit_at_step=4")
    ckpts = run / "checkpoints"
    for tag in ("step_000002", "step_000004"):
        meta = checkpoint.read_meta(ckpts, tag)
        assert meta["files"] == checkpoint.file_manifest(ckpts / tag)  # every file, every checksum right
    assert sum("zero_pp_rank_" in f for f in meta["files"]) == 2
    want = read_metrics(run, "train/loss")

    bad = ckpts / "step_000004" / next(f for f in meta["files"] if "zero_pp_rank_1_" in f)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))  # read (and hashed) by rank 1 only
    proc = run_launcher(2, *COMMON, f"train.out_dir={run}", "train.exit_at_step=3")
    assert f"skipped step_000004 ({bad}: checksum mismatch" in proc.stderr
    assert read_metrics(run, "train/loss")[3] == want[3]  # both ranks went back to step 2
    assert json.loads((ckpts / "step_000004" / checkpoint.META_FILE).read_text())  # left on disk
