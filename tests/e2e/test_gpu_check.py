"""tools/gpu_check.sh --dry-run works on a machine without a GPU: it prints every command the GPU
run would make, checks the files, configs and flags they use (one tiny CPU step per model family),
writes nothing and exits 0."""
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_dry_run_prints_the_plan_and_checks_it(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(out), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = proc.stdout
    assert "CHECK FAILED" not in text, text
    # Every command of the real run is printed, exactly.
    assert "-m pytest -q -rs -p no:cacheprovider --timeout=60 tests/ops/test_scan_triton.py" in text
    for op in ("scan", "rglru", "ssd", "newton"):
        assert f"tools/bench_kernels.py --only {op}" in text
    for model in ("griffin-1b", "mamba2-1.3b", "paragru-1b"):
        assert (f"-m megarnn bench step configs/quickstart.yaml model=configs/model/{model}.yaml "
                "--steps 3 --warmup 1") in text
        assert f"ok  configs/model/{model}.yaml" in text
    for family in ("griffin", "mamba2", "paragru"):
        assert f"ok  tiny CPU step (configs/model/{family}-tiny.yaml): median" in text
    assert "pip install -q --only-binary=:all: mamba-ssm" in text
    assert "dry run: all commands, files, configs and flags check out" in text
    assert out.read_text() == "# Benchmarks\n"  # a dry run writes nothing


def test_gpu_check_refuses_unknown_arguments():
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "unknown argument '--bogus'" in proc.stderr
