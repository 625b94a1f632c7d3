"""megarnn.load(path) -> (model, tokenizer) from a run dir, its checkpoints dir, or one checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from megarnn.config import Config
from megarnn.data.tokenizer import Tokenizer
from megarnn.errors import CheckpointError
from megarnn.models import RecurrentLM
from megarnn.train.checkpoint import resolve_checkpoint


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[RecurrentLM, Tokenizer]:
    """Rebuild the model of a DeepSpeed checkpoint (any ZeRO stage) in float32, on `device`."""
    ckpt_dir, tag = resolve_checkpoint(path)
    d = ckpt_dir / tag
    cfg_file = d / "config.yaml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{d}: config.yaml is missing; the checkpoint is incomplete")
    import yaml
    cfg = Config.from_dict(yaml.safe_load(cfg_file.read_text()))
    tokenizer = Tokenizer.load(d / "tokenizer")
    model = RecurrentLM(cfg.model)
    model.load_state_dict(_module_state_dict(ckpt_dir, tag))
    return model.to(device).eval(), tokenizer


def _module_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    d = ckpt_dir / tag
    files = sorted(d.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{d}: no mp_rank_*_model_states.pt; not a DeepSpeed checkpoint")
    sd = torch.load(files[0], map_location="cpu", weights_only=False)
    module = sd.get("module")
    if module and all(v.numel() > 0 for v in module.values()):
        return {k: v.float() for k, v in module.items()}
    # ZeRO-3 keeps only partitions in the model file: gather them from the optimizer shards.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
