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

    again = "export the checkpoint again (megarnn export CHECKPOINT OUT)"
    try:
        config = json.loads((d / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{d / 'config.json'}: unreadable ({' '.join(str(e).split())}); {again}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{d / 'config.json'}: expected a JSON object, got {type(config).__name__}; {again}")
    try:
        sd = load_file(str(d / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{d / 'model.safetensors'}: not a readable safetensors file "
                              f"({' '.join(str(e).split())}); the file is damaged: {again}") from None
    if CONFIG_KEY in config:
        try:
            mc = ModelConfig(**config[CONFIG_KEY])
        except TypeError as e:
            raise CheckpointError(f"{d / 'config.json'}: {CONFIG_KEY} does not describe a model ({e}); {again}") from None
    elif config.get("model_type") in ("recurrent_gemma", "mamba2"):
        try:
            mc = hf_config_to_model_config(config)
        except KeyError as e:
            raise CheckpointError(f"{d / 'config.json'}: the {config['model_type']} config lacks {e}; {again}") from None
        sd = from_hf_state_dict(sd, mc)
    else:
        raise CheckpointError(f"{d / 'config.json'}: neither a megarnn export nor a RecurrentGemma / Mamba2 config")
    model = RecurrentLM(mc)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:  # shapes or names that are not this config's model
        detail = next((x.strip() for x in str(e).splitlines()[1:] if x.strip()), str(e).splitlines()[0])
        raise CheckpointError(f"{d}: the weights in model.safetensors do not fit the model in config.json "
                              f"({detail.rstrip('.')[:300]}); the two files come from different models: {again}") from None
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
