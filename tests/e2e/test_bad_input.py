"""Bad input: one actionable line on stderr, exit status 2, and nothing half-written."""
import pytest

from megarnn.cli import main
from tests.conftest import TINY, run_cli
from tests.e2e.test_quickstart import quickstart_run  # noqa: F401  (reuses the module's run)


def _fails(capsys, *argv, match):
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("megarnn ") and "error:" in err
    assert match in err, err
    return err


def test_unknown_key(capsys, tmp_path):
    _fails(capsys, "train", "configs/quickstart.yaml", "train.max_step=3", f"train.out_dir={tmp_path / 'r'}",
           match="did you mean 'train.max_steps'")
    assert not (tmp_path / "r").exists()


def test_wrong_type(capsys, tmp_path):
    _fails(capsys, "train", "configs/quickstart.yaml", "train.micro_batch_size=big",
           f"train.out_dir={tmp_path / 'r'}", match="train.micro_batch_size='big' has the wrong type")
    assert not (tmp_path / "r").exists()


def test_missing_corpus_path(capsys, tmp_path):
    _fails(capsys, "train", "configs/quickstart.yaml", f"data.train_files=[{tmp_path}/nope/*.txt]", "data.holdout=[]",
           f"train.out_dir={tmp_path / 'r'}", match="matches no file")
    assert not (tmp_path / "r").exists()


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    _fails(capsys, "train", "configs/quickstart.yaml", f"train.out_dir={blocker}/run", match="is not writable")
    assert blocker.read_text() == "not a directory"


def test_missing_checkpoint_for_generate(capsys, tmp_path):
    _fails(capsys, "generate", str(tmp_path), "--prompt", "x", match="no checkpoint in")


def test_checkpoint_from_another_model(capsys, quickstart_run):  # noqa: F811
    run, _ = quickstart_run
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    _fails(capsys, "train", "configs/quickstart.yaml", *TINY, "model.d_model=64", f"train.out_dir={run}",
           match="model.d_model: checkpoint 32 vs config 64")
    # An explicit resume path from another model fails the same way, and nothing in the run changed.
    _fails(capsys, "train", "configs/quickstart.yaml", *TINY, "model.n_layers=2", "train.out_dir=" + str(run.parent / "other"),
           f"train.resume={run / 'checkpoints'}", match="model.n_layers: checkpoint 3 vs config 2")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert not (run.parent / "other").exists()


def test_cli_process_exit_status(tmp_path):
    proc = run_cli("train", "configs/quickstart.yaml", "model.d_modle=8", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("megarnn train: error: unknown config key 'model.d_modle'; did you mean "
                                   "'model.d_model'? (valid keys under model: " + proc.stderr.split("under model: ")[1].strip())
