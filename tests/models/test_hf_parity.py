"""Griffin / Hawk agree number for number with transformers' RecurrentGemmaForCausalLM."""
import pytest
import torch

from megarnn.config import ModelConfig
from megarnn.export import from_hf_state_dict, griffin_hf_config, hf_config_to_model_config, to_hf_state_dict
from megarnn.models import RecurrentLM

transformers = pytest.importorskip("transformers")


class _Tok:  # the three ids griffin_hf_config reads
    bos_id, eos_id = 1, 2

    class sp:
        @staticmethod
        def pad_id():
            return 3


def _randomize(model):
    """Away from the init (norm weights 0, biases 0) so every parameter matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("pattern,window", [("RRA", 6), ("R", 2048)])
def test_logits_equal_transformers_recurrent_gemma(pattern, window):
    c = ModelConfig(vocab_size=101, d_model=48, n_layers=4, n_heads=4, block_pattern=pattern,
                    family="griffin" if "A" in pattern else "hawk", attention_window=window)
    ours = RecurrentLM(c)
    _randomize(ours)
    hf_cfg = transformers.RecurrentGemmaConfig(**{k: v for k, v in griffin_hf_config(c, _Tok).items()
                                                  if k not in ("architectures", "model_type", "torch_dtype")})
    hf = transformers.RecurrentGemmaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours, c), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    tokens = torch.randint(0, 101, (2, 20))  # longer than the attention window
    with torch.no_grad():
        expect = hf(tokens, use_cache=False).logits
        got, _ = ours(tokens)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    # And back: the HF names map onto ours one to one.
    back = RecurrentLM(hf_config_to_model_config(griffin_hf_config(c, _Tok)))
    back.load_state_dict(from_hf_state_dict(hf.state_dict(), c))
    torch.testing.assert_close(back(tokens)[0], got, rtol=0, atol=0)


@pytest.mark.parametrize("T,chunk", [(20, 8), (7, 64)])
def test_mamba2_logits_equal_transformers(T, chunk):
    from megarnn.export import hf_config, hf_names
    c = ModelConfig(family="mamba2", block_pattern="M", vocab_size=101, d_model=32, n_layers=3, d_state=8,
                    ssm_head_dim=16, n_groups=2, chunk_size=chunk, norm_eps=1e-5, tie_embeddings=True)
    ours = RecurrentLM(c)
    _randomize(ours)
    cfg = {k: v for k, v in hf_config(c, _Tok).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours, c), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert len(hf_names(c)) == len(list(ours.parameters()))
    hf.tie_weights()
    tokens = torch.randint(0, 101, (2, T))
    with torch.no_grad():
        expect = hf(tokens, use_cache=False).logits
        got, _ = ours(tokens)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    back = RecurrentLM(hf_config_to_model_config({"model_type": "mamba2", **cfg}))
    back.load_state_dict(from_hf_state_dict(hf.state_dict(), c))
    torch.testing.assert_close(back(tokens)[0], got, rtol=0, atol=0)
