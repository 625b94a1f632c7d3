"""megarnn.load(path) -> (model, tokenizer).

path may be a run directory, its checkpoints/ directory, one step_* checkpoint, or an
export directory (ours or Hugging Face's RecurrentGemma layout, see megarnn/export.py).
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import tempfile
from pathlib import Path

import torch

from megarnn.config import Config, ModelConfig
from megarnn.data.tokenizer import Tokenizer
from megarnn.errors import CheckpointError
from megarnn.models import RecurrentLM
from megarnn.parallel.tensor import merge_shards
from megarnn.train.checkpoint import read_meta, resolve_checkpoint, verify


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

    from megarnn.export import CONFIG_KEY, from_hf_state_dict, hf_config_to_model_config
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
    ckpt_dir, tag = resolve_checkpoint(path)
    d = ckpt_dir / tag
    cfg_file = d / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{d}: config.yaml is missing; the checkpoint is incomplete")
    import yaml
    cfg = Config.from_dict(yaml.safe_load(cfg_file.read_text()))
    verify(d, read_meta(ckpt_dir, tag))
    model = RecurrentLM(cfg.model)
    model.load_state_dict(_module_state_dict(ckpt_dir, tag))
    return model, Tokenizer.load(d / "tokenizer")


def _module_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The full model's weights, fp32: tensor-parallel shards merged as megarnn.json says, from
    the model files (ZeRO 0-2), the pipeline layer files, or ZeRO-3's partitions."""
    d = ckpt_dir / tag
    meta = json.loads((d / "megarnn.json").read_text())
    splits = meta.get("tp_split", {})
    layout = {"tp": 1, **meta.get("parallel", {}), **meta.get("layout", {})}
    if any(d.glob("layer_*-model_states.pt")):
        return _pipeline_state_dict(d, meta["model"]["n_layers"], splits)
    if layout.get("zero_stage") == 3:
        return _zero3_state_dict(d, layout["tp"], splits)
    files = sorted(d.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{d}: no mp_rank_*_model_states.pt; not a DeepSpeed checkpoint")
    shards = [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]
    return _merge(shards, splits)


def _merge(shards: list[dict[str, torch.Tensor]], splits: dict) -> dict[str, torch.Tensor]:
    """Tensor-parallel ranks' state dicts (in rank order) -> the full one, fp32."""
    return {k: merge_shards([m[k] for m in shards], *splits[k]).float() if k in splits else v.float()
            for k, v in shards[0].items()}


def _zero3_state_dict(d: Path, tp: int, splits: dict) -> dict[str, torch.Tensor]:
    """ZeRO-3 keeps every weight partitioned over the data-parallel ranks, in the optimizer files.
    DeepSpeed's zero_to_fp32 gathers them for one tensor-parallel rank at a time, reading the
    names of rank 0: each rank's files are shown to it under those names (symbolic links)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    shards = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(tp):
            view = Path(tmp) / f"tp_rank_{r}"
            view.mkdir()
            for f in d.glob(f"*mp_rank_{r:02d}_*.pt"):
                (view / f.name.replace(f"mp_rank_{r:02d}", "mp_rank_00")).symlink_to(f.resolve())
            with contextlib.redirect_stdout(io.StringIO()):  # its progress lines are not ours to print
                shards.append(get_fp32_state_dict_from_zero_checkpoint(tmp, tag=view.name))
    return _merge(shards, splits)


def _pipeline_state_dict(d: Path, n_layers: int, splits: dict) -> dict[str, torch.Tensor]:
    """A pipeline checkpoint: one file per layer and tensor-parallel rank,
    layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt, keys relative to the layer
    (megarnn/parallel/pipeline.py maps them to RecurrentLM names)."""
    from megarnn.parallel.pipeline import lm_name
    shards: dict[int, dict[int, dict]] = {}
    for f in d.glob("layer_*-model_states.pt"):
        m = re.fullmatch(r"layer_(\d+)-model_(\d+)-model_states\.pt", f.name)
        if m is None:
            raise CheckpointError(f"{f}: unexpected pipeline layer file name; expected layer_XX-model_YY-model_states.pt")
        shards.setdefault(int(m.group(1)), {})[int(m.group(2))] = torch.load(f, map_location="cpu", weights_only=False)
    out = {}
    for idx, by_rank in sorted(shards.items()):
        parts = [by_rank[r] for r in sorted(by_rank)]
        for key in parts[0]:
            name = lm_name(f"{idx}.{key}", n_layers)
            out[name] = (merge_shards([p[key] for p in parts], *splits[name]) if name in splits else parts[0][key]).float()
    return out
