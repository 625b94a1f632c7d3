"""Every family trains through `megarnn train` by changing only the model config, exports, and
loads back (Hawk and Mamba2 also in transformers; Griffin is the quickstart's own test)."""
import pytest
import torch

import megarnn
from tests.conftest import TINY, run_cli
from tests.e2e.test_quickstart import read_metrics


@pytest.mark.parametrize("model,fmt", [("hawk-tiny", "hf"), ("mamba2-tiny", "hf"), ("paragru-tiny", "safetensors"),
                                       ("paralstm-tiny", "safetensors")])
def test_family_trains_exports_and_loads(tmp_path, model, fmt):
    run = tmp_path / "run"
    run_cli("train", "configs/quickstart.yaml", *TINY, f"model=configs/model/{model}.yaml", f"train.out_dir={run}",
            "train.max_steps=6", "train.eval_interval=6", "data.holdout=[macbeth_gut.txt]", "train.lr=1e-2")
    losses = read_metrics(run, "train/loss")
    assert losses[6] < losses[1]
    if model.startswith("para"):
        assert read_metrics(run, "newton/residual/layer_0")[6] < 1e-4
        assert read_metrics(run, "newton/iters/layer_1")[6] <= 10  # 0 on CPU: the torch backend solves sequentially
    run_cli("export", run, tmp_path / "out", "--format", fmt)
    ours, tok = megarnn.load(run)
    exported, _ = megarnn.load(tmp_path / "out")
    tokens = torch.tensor([[tok.bos_id] + tok.encode("Is this a dagger which I see before me?")])
    expect = ours(tokens)[0]
    torch.testing.assert_close(exported(tokens)[0], expect, rtol=0, atol=0)
    if fmt == "hf":
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(tokens, use_cache=False).logits, expect, rtol=1e-5, atol=1e-5)
    else:
        proc = run_cli("export", run, tmp_path / "hf", "--format", "hf", check=False)
        assert proc.returncode == 2 and "no Hugging Face transformers architecture" in proc.stderr
        assert not (tmp_path / "hf").exists()
