"""`megarnn plot`: runs' metrics.jsonl -> one PNG, a panel per quantity, runs overlaid; a training
run draws RUN/curves.png at its end."""
import json
import sys

import pytest

from megarnn.cli import main
from tests.conftest import TINY, run_cli
from tests.e2e.test_honest_numbers import PLAYS

PNG = b"\x89PNG\r\n\x1a\n"


def _fake_run(path, scale, newton=False):
    path.mkdir(parents=True)
    lines = []
    for step in range(1, 21):
        lines += [{"step": step, "tag": "train/loss", "value": scale * 7 / step ** 0.3},
                  {"step": step, "tag": "train/lr", "value": 3e-3 * min(1, step / 5)},
                  {"step": step, "tag": "train/tokens_per_sec", "value": 1000.0 + step}]
        if newton:
            lines += [{"step": step, "tag": f"newton/iters/layer_{i}", "value": 3.0 + i} for i in range(2)]
        if step % 10 == 0:
            lines += [{"step": step, "tag": "val/loss", "value": scale * 6.5 / step ** 0.3},
                      {"step": step, "tag": "val/bpc", "value": scale * 3 / step ** 0.3}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_two_runs_overlaid_into_one_png(tmp_path, capsys):
    a, b = _fake_run(tmp_path / "a", 1.0), _fake_run(tmp_path / "b", 1.1, newton=True)
    out = tmp_path / "cmp" / "both.png"
    assert main(["plot", str(a), str(b / "metrics.jsonl"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    assert f"written to {out}" in capsys.readouterr().out


def test_one_run_defaults_to_its_curves_png_and_reads_the_last_value_of_a_repeated_step(tmp_path):
    from megarnn.plot import read_metrics
    run = _fake_run(tmp_path / "run", 1.0, newton=True)
    with open(run / "metrics.jsonl", "a") as f:  # resumed from step 10: steps 11.. again, then a torn line
        f.write(json.dumps({"step": 11, "tag": "train/loss", "value": 0.5}) + "\n" + '{"step": 12, "ta')
    m = read_metrics(run)
    assert m["train/loss"][11] == 0.5 and m["newton/iters/"][1] == 3.5
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == PNG


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no metrics.jsonl" in err, err
    run = _fake_run(tmp_path / "run", 1.0)
    text = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(text[:3] + ["garbage"] + text[3:]) + "\n")
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.jsonl:4: not a metrics line" in err, err


def test_without_matplotlib_a_one_line_error_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    run = _fake_run(tmp_path / "run", 1.0)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'megarnn[plot]'" in err, err
    assert not (run / "curves.png").exists()
    from megarnn.plot import write_curves
    assert write_curves(run) is None  # the end of `megarnn train`: skipped without a word


def test_training_draws_its_curves_at_the_end(tmp_path):
    pytest.importorskip("matplotlib")
    texts = tmp_path / "texts"
    texts.mkdir()
    play = (PLAYS / "hamlet_gut.txt").read_text()
    (texts / "a.txt").write_text(play[:20000])
    (texts / "b.txt").write_text(play[20000:24000])
    run = tmp_path / "run"
    proc = run_cli("train", "configs/quickstart.yaml", *TINY, f"data.train_files=[{texts}/*.txt]",
                   "data.holdout=[b.txt]", "train.warmup_steps=1", "train.max_steps=3", "train.eval_interval=3", f"train.out_dir={run}")
    assert (run / "curves.png").read_bytes()[:8] == PNG
    assert f"curves: {run / 'curves.png'}" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("held-out bits per character: ")


def test_panels_loss_against_tokens_where_logged_and_no_all_zero_newton_panel():
    from megarnn.plot import LOSS_TOKENS, choose_panels
    base = {"train/loss": {1: 7.0, 2: 6.0}}
    titles = lambda data: [p[0] for p in choose_panels(data)]
    assert titles([base]) == ["loss"]
    assert titles([base, {**base, "train/tokens": {2: 8192.0}}]) == ["loss", LOSS_TOKENS]
    assert "Newton iterations (mean over layers)" not in titles([{**base, "newton/iters/": {1: 0.0, 2: 0.0}}])
    assert "Newton iterations (mean over layers)" in titles([{**base, "newton/iters/": {1: 0.0, 2: 3.0}}])


def test_tokens_per_step_of_an_older_run_from_its_log(tmp_path):
    """A run logged before train/tokens: the tokens panel takes its tokens per step from log.txt."""
    from megarnn.plot import TOKENS, _with_tokens, read_metrics
    run = _fake_run(tmp_path / "old", 1.0)
    (run / "log.txt").write_text("2026-11-29 04:53:06 data: 1,812,672 training tokens; 4,096 tokens per step "
                                 "(16 sequences of 256); 150 steps read 614,400 tokens: 0.339 epochs\n")
    d = _with_tokens(read_metrics(run), run)
    assert d[TOKENS][10] == 40960.0
    bare = _fake_run(tmp_path / "bare", 1.0)
    assert TOKENS not in _with_tokens(read_metrics(bare), bare)
