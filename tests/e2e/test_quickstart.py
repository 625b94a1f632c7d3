"""The quickstart pipeline at tiny size, through the real CLI in fresh processes."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import TINY, run_cli

TAGS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu", "val/loss", "val/bpc"]


def read_metrics(run_dir, tag):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["value"] for m in lines if m["tag"] == tag}


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("quickstart") / "run"
    proc = run_cli("train", "configs/quickstart.yaml", *TINY, f"train.out_dir={run}", "train.max_steps=40",
                   "train.eval_interval=20", "train.save_interval=20", "train.lr=1e-2",
                   "train.sample_tokens=20", "train.sample_prompt=KING.")
    return run, proc


def test_quickstart_trains_evaluates_saves_and_samples(quickstart_run):
    run, proc = quickstart_run
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("held-out bits per character: ")
    bpc = float(lines[-1].split(": ")[1])
    assert "sample:" in proc.stdout and "KING." in proc.stdout
    losses = read_metrics(run, "train/loss")
    assert len(losses) == 40
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(36, 41)) / 5
    assert last < first - 1.0, (first, last)
    val_bpc = read_metrics(run, "val/bpc")
    assert sorted(val_bpc) == [20, 40] and val_bpc[40] < val_bpc[20]
    assert abs(val_bpc[40] - bpc) < 1e-3
    # The run directory: resolved config, checkpoints with `latest`, tokenizer, TensorBoard, log.txt.
    assert (run / "config.yaml").is_file() and (run / "log.txt").is_file()
    assert (run / "checkpoints" / "latest").read_text() == "step_000040"
    for f in ("config.yaml", "megarnn.json", "tokenizer/tokenizer.model", "mp_rank_00_model_states.pt"):
        assert (run / "checkpoints" / "step_000040" / f).is_file()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert set(TAGS) <= set(events.Tags()["scalars"])
    assert "train/loss" in (run / "log.txt").read_text()


def test_generate_and_eval_work_on_the_checkpoint(quickstart_run):
    run, _ = quickstart_run
    out = run_cli("generate", run / "checkpoints", "--prompt", "HAMLET.", "--max-new-tokens", "15").stdout
    assert out.startswith("HAMLET.") and len(out) > len("HAMLET.") + 5
    metrics = json.loads(run_cli("eval", run / "checkpoints", "--data", run / "data" / "val").stdout)
    # The same held-out documents as the trainer's final eval, read with another chunk size.
    assert metrics["bits_per_char"] == pytest.approx(read_metrics(run, "val/bpc")[40], rel=1e-4)
    assert metrics["tokens"] > 1000 and metrics["perplexity"] > 1


def test_dry_run_prints_size_without_training(tmp_path):
    out = run_cli("train", "configs/quickstart.yaml", "--dry-run", f"train.out_dir={tmp_path / 'r'}").stdout
    assert out.startswith("parameters: ") and "FLOPs per token" in out
    assert not (tmp_path / "r").exists()


def test_export_formats_load_back_and_in_transformers(quickstart_run, tmp_path):
    import torch
    import transformers

    import megarnn
    run, _ = quickstart_run
    model, tok = megarnn.load(run)
    tokens = torch.tensor([[tok.bos_id] + tok.encode("KING LEAR.\nWhat says our second daughter?")])
    expect, _ = model(tokens)
    for fmt in ("safetensors", "hf"):
        out = tmp_path / fmt
        assert "exported to" in run_cli("export", run / "checkpoints", out, "--format", fmt).stdout
        again, tok2 = megarnn.load(out)
        assert tok2.sha256 == tok.sha256
        torch.testing.assert_close(again(tokens)[0], expect, rtol=0, atol=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("KING LEAR.\nWhat says our second daughter?")["input_ids"] == tokens[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens, use_cache=False).logits, expect, rtol=1e-5, atol=1e-5)
    err = run_cli("export", run, tmp_path / "hf", check=False)
    assert err.returncode == 2 and "is not empty" in err.stderr
