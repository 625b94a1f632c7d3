"""Export a checkpoint to a self-contained directory.

    megarnn export CHECKPOINT OUT --format safetensors   # our names, loads with megarnn.load
    megarnn export CHECKPOINT OUT --format hf            # Hugging Face transformers layout

`safetensors`: config.json ({"megarnn_model": ModelConfig}), model.safetensors with our
parameter names, tokenizer.model.
`hf`: Griffin / Hawk as `RecurrentGemmaForCausalLM`, Mamba2 as `Mamba2ForCausalLM`:
config.json, generation_config.json, model.safetensors with transformers' parameter names
(mapped one to one), and the tokenizer, so `AutoModelForCausalLM.from_pretrained(OUT)` loads
it and `generate()` runs with its defaults. Hawk (no attention layer) is written with
use_cache false: transformers' RecurrentGemma cache needs an attention layer (megarnn/hf.py).
megarnn.load reads both formats.

The directory is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
from pathlib import Path

from megarnn.files import atomic_path
from megarnn.hf import (CONFIG_KEY, ExportError, from_hf_state_dict, griffin_config_from_hf,  # noqa: F401 - public
                        griffin_hf_config, griffin_to_hf_names, hf_config, hf_config_to_model_config,
                        hf_generation_config, hf_names,
                        mamba2_hf_config, mamba2_to_hf_names, to_hf_state_dict)
from megarnn.loading import load


def export(checkpoint: str | Path, out_dir: str | Path, fmt: str = "safetensors") -> Path:
    from safetensors.torch import save_file

    if fmt not in ("safetensors", "hf"):
        raise ExportError(f"--format {fmt!r}; expected safetensors or hf")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new output directory or remove it")
    model, tokenizer = load(checkpoint)
    c = model.config
    with atomic_path(out) as tmp:  # renamed to out (absent or empty) only when complete
        tmp.mkdir()
        if fmt == "hf":
            config = hf_config(c, tokenizer)
            save_file(to_hf_state_dict(model, c), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "generation_config.json").write_text(json.dumps(hf_generation_config(c, tokenizer), indent=2))
            write_hf_tokenizer(tokenizer, tmp)
        else:
            config = {CONFIG_KEY: c.__dict__.copy()}
            sd = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out


def write_hf_tokenizer(tokenizer, directory: Path) -> None:
    """tokenizer_config.json beside tokenizer.model: transformers' GemmaTokenizer reads our
    SentencePiece model as it is and encodes exactly as we do; it adds <s> first, as our
    documents start."""
    sp = tokenizer.sp
    config = {
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": sp.IdToPiece(sp.bos_id()), "eos_token": sp.IdToPiece(sp.eos_id()),
        "unk_token": sp.IdToPiece(sp.unk_id()), "pad_token": sp.IdToPiece(sp.pad_id()),
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
