"""megarnn.load(path) -> (model, tokenizer).

path may be a run directory, its checkpoints/ directory, one step_* checkpoint, or an
export directory (ours or Hugging Face's RecurrentGemma layout, see megarnn/export.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megarnn.config import Config, ModelConfig
from megarnn.data.tokenizer import Tokenizer
from megarnn.errors import CheckpointError
from megarnn.hf import CONFIG_KEY, from_hf_state_dict, hf_config_to_model_config
from megarnn.models import RecurrentLM
from megarnn.train.checkpoint import read_meta, resolve_checkpoint, verify
from megarnn.train.ds_checkpoint import read_weights


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[RecurrentLM, Tokenizer]:
    """Rebuild the model in float32 on `device`, in eval mode, with its tokenizer."""
    p = Path(path)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        model, tokenizer = _load_export(p)
    else:
        model, tokenizer = _load_checkpoint(p)
    return model.to(device).eval(), tokenizer


def _load_export(d: Path) -> tuple[RecurrentLM, Tokenizer]:
    from safetensors.torch import load_file

    config = json.loads((d / "config.json").read_text())
    sd = load_file(str(d / "model.safetensors"))
    if CONFIG_KEY in config:
        mc = ModelConfig(**config[CONFIG_KEY])
    elif config.get("model_type") in ("recurrent_gemma", "mamba2"):
        mc = hf_config_to_model_config(config)
        sd = from_hf_state_dict(sd, mc)
    else:
        raise CheckpointError(f"{d / 'config.json'}: neither a megarnn export nor a RecurrentGemma / Mamba2 config")
    model = RecurrentLM(mc)
    model.load_state_dict(sd)
    return model, Tokenizer.load(d)


def _load_checkpoint(path: Path) -> tuple[RecurrentLM, Tokenizer]:
    """A DeepSpeed checkpoint (any ZeRO stage)."""
    ckpt_dir, tag = resolve_checkpoint(path, fallback=False)
    d = ckpt_dir / tag
    cfg_file = d / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{d}: config.yaml is missing; the checkpoint is incomplete")
    import yaml
    cfg = Config.from_dict(yaml.safe_load(cfg_file.read_text()))
    verify(d, read_meta(ckpt_dir, tag))
    model = RecurrentLM(cfg.model)
    model.load_state_dict(read_weights(ckpt_dir, tag))
    return model, Tokenizer.load(d / "tokenizer")
