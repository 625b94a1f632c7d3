"""`megarnn bench step` times a config's training steps on random tokens without writing
anything; `megarnn bench kernels` runs the kernel benchmark; bad arguments exit 2."""
import re

from tests.conftest import TINY, run_cli


def test_bench_step_prints_throughput_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("bench", "step", "configs/quickstart.yaml", *TINY, f"train.out_dir={run}", "--steps", "2",
                   "--warmup", "1", env={"OMP_NUM_THREADS": "1"})
    assert re.search(r"^step 2: [0-9.]+ s, loss [0-9.]+$", proc.stdout, re.M), proc.stdout
    m = re.search(r"^median ([0-9.]+) s/step  ([0-9,]+) tokens/s  MFU ([0-9.]+)%", proc.stdout, re.M)
    assert m and float(m.group(1)) > 0 and int(m.group(2).replace(",", "")) > 0, proc.stdout
    # One more step under the host-sync counter: neither the model nor the trainer's step reads
    # anything on the host (loss and grad norm are read once per log interval); what is left is
    # DeepSpeed's optimizer checks (BENCHMARKS.md).
    m = re.search(r"^host syncs in one step \(rank 0\): (\d+)$", proc.stdout, re.M)
    assert m and int(m.group(1)) <= 6, proc.stdout
    sites = proc.stdout[m.end():]
    assert not re.search(r"(loop|blocks|lm|cells|scan|conv|attention)\.py", sites), proc.stdout
    assert not run.exists()


def test_bench_kernels_runs_the_kernel_table():
    proc = run_cli("bench", "kernels", "--only", "scan", "--no-compile", env={"OMP_NUM_THREADS": "1"})
    assert "copy bandwidth" in proc.stdout and "megarnn torch backend" in proc.stdout, proc.stdout


def test_bench_bad_arguments_exit_2():
    proc = run_cli("bench", "step", "configs/quickstart.yaml", *TINY, "--steps", "0", check=False)
    assert proc.returncode == 2 and "expected --steps >= 1" in proc.stderr
    proc = run_cli("bench", "step", "configs/quickstart.yaml", "train.no_such_key=1", check=False)
    assert proc.returncode == 2 and "no_such_key" in proc.stderr


def test_train_compile_runs_the_compiled_model_with_the_eager_losses():
    """train.compile=true: build_model compiles the model's forward (fullgraph, Inductor on CPU);
    the steps' losses equal the eager run's."""
    args = ["bench", "step", "configs/quickstart.yaml", *TINY, "model=configs/model/paragru-tiny.yaml",
            "--steps", "2", "--warmup", "1"]
    losses = []
    for compile_ in ("false", "true"):
        proc = run_cli(*args, f"train.compile={compile_}", env={"OMP_NUM_THREADS": "1"})
        losses.append([float(x) for x in re.findall(r"^step \d+: [0-9.]+ s, loss ([0-9.]+)$", proc.stdout, re.M)])
    assert len(losses[0]) == 2 and losses[1] == losses[0], losses
