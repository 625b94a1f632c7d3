"""train.resume=auto always finds a good checkpoint: when `latest` is garbage or names a checkpoint
that fails verification, resolve_checkpoint walks back to the newest step_* directory that verifies,
says so on one line, and deletes nothing; megarnn.load's strict resolution still refuses."""
import json

import pytest

from megarnn.errors import CheckpointError
from megarnn.train import checkpoint
from tests.conftest import TINY, run_cli
from tests.e2e.test_quickstart import read_metrics


def _fake_checkpoint(ckpt_dir, step):
    """A step directory with two files and a megarnn.json listing them (no DeepSpeed needed)."""
    d = ckpt_dir / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * step)
    (d / "config.yaml").write_text(f"step: {step}\n")
    (d / checkpoint.META_FILE).write_text(json.dumps({"step": step, "files": checkpoint.file_manifest(d)}))
    (ckpt_dir / "latest").write_text(d.name)
    return d


def _flip_a_byte(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


@pytest.fixture
def ckpts(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path / "checkpoints", step)
    return tmp_path / "checkpoints"


def test_good_latest_is_used_silently(ckpts, capsys):
    assert checkpoint.resolve_checkpoint(ckpts.parent) == (ckpts, "step_000006")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("damage,why", [
    (lambda d: _flip_a_byte(d / "mp_rank_00_model_states.pt"), "checksum mismatch"),
    (lambda d: (d / "config.yaml").unlink(), "missing from the checkpoint"),
    (lambda d: (d / "config.yaml").write_text("x"), "bytes, expected"),
    (lambda d: (d / checkpoint.META_FILE).unlink(), "megarnn.json: unreadable"),
    (lambda d: (d / checkpoint.META_FILE).write_text("{not json"), "megarnn.json: unreadable"),
])
def test_damaged_latest_falls_back_to_the_previous_one(ckpts, capsys, damage, why):
    damage(ckpts / "step_000006")
    before = sorted(p.relative_to(ckpts) for p in ckpts.rglob("*"))
    assert checkpoint.resolve_checkpoint(ckpts) == (ckpts, "step_000004")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"resuming from {ckpts / 'step_000004'}" in err[0]
    assert "skipped step_000006 (" in err[0] and why in err[0]
    assert sorted(p.relative_to(ckpts) for p in ckpts.rglob("*")) == before  # nothing deleted
    with pytest.raises(CheckpointError):  # megarnn.load's resolution does not walk back
        checkpoint.resolve_checkpoint(ckpts, fallback=False)
        checkpoint.verify(ckpts / "step_000006", checkpoint.read_meta(ckpts, "step_000006"))


@pytest.mark.parametrize("latest", [b"\xff\xfe\x00garbage", b"", b"step_000099", b"../elsewhere"])
def test_garbage_latest_takes_the_newest_that_verifies(ckpts, capsys, latest):
    (ckpts / "latest").write_bytes(latest)
    _flip_a_byte(ckpts / "step_000006" / "mp_rank_00_model_states.pt")
    assert checkpoint.resolve_checkpoint(ckpts) == (ckpts, "step_000004")
    err = capsys.readouterr().err
    assert "skipped `latest` " in err and "step_000006 (" in err
    assert (ckpts / "latest").read_bytes() == latest  # left as it was
    with pytest.raises(CheckpointError, match="point train.resume at an earlier step_\\* directory"):
        checkpoint.resolve_checkpoint(ckpts, fallback=False)


def test_newer_incomplete_save_is_not_considered(ckpts):
    (ckpts / "step_000008").mkdir()  # a save that crashed before megarnn.json and `latest`
    _flip_a_byte(ckpts / "step_000006" / "mp_rank_00_model_states.pt")
    assert checkpoint.resolve_checkpoint(ckpts)[1] == "step_000004"


def test_no_checkpoint_verifies(ckpts):
    for step in (2, 4, 6):
        _flip_a_byte(ckpts / checkpoint.tag_for(step) / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies: step_000006 .*checksum mismatch.*"
                                              "start afresh with train.resume=never"):
        checkpoint.resolve_checkpoint(ckpts)


def test_verify_is_not_repeated_for_unchanged_files(ckpts, monkeypatch):
    meta = checkpoint.read_meta(ckpts, "step_000004")
    checkpoint.verify(ckpts / "step_000004", meta)
    monkeypatch.setattr(checkpoint, "file_manifest", lambda d: pytest.fail("hashed again"))
    checkpoint.verify(ckpts / "step_000004", meta)
    monkeypatch.undo()
    _flip_a_byte(ckpts / "step_000004" / "mp_rank_00_model_states.pt")  # a change is seen
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoint.verify(ckpts / "step_000004", meta)


def test_tiny_run_resumes_from_the_previous_checkpoint_when_the_newest_is_corrupt(tmp_path):
    run = tmp_path / "run"
    args = ["train", "configs/quickstart.yaml", *TINY, "train.save_interval=2", "train.eval_interval=100",
            "data.holdout=[]", f"train.out_dir={run}", "train.max_steps=6"]
    run_cli(*args, "train.exit_at_step=4")
    want = read_metrics(run, "train/loss")
    bad = run / "checkpoints" / "step_000004" / "mp_rank_00_model_states.pt"
    _flip_a_byte(bad)
    damaged = bad.read_bytes()
    proc = run_cli(*args, "train.exit_at_step=3")  # resume=auto (the default); stop before step 4 is saved again
    assert f"resumed from {run / 'checkpoints' / 'step_000002'} at step 2" in proc.stdout
    assert f"skipped step_000004 ({bad}: checksum mismatch" in proc.stderr
    assert bad.read_bytes() == damaged  # the bad checkpoint is left alone
    assert read_metrics(run, "train/loss")[3] == want[3]  # step 3 again, from step 2's state: the same loss
