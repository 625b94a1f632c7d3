"""Our model <-> Hugging Face transformers: parameter names, configs and state dicts.

Griffin / Hawk map to `RecurrentGemmaForCausalLM`, Mamba2 to `Mamba2ForCausalLM`, one parameter to
one parameter (only the depthwise conv weights change shape: ours (D, W), transformers' (D, 1, W)).
Written by `megarnn export --format hf` (megarnn/export.py) and read back by megarnn.load
(megarnn/loading.py); both import this module, which imports neither.
"""
from __future__ import annotations

import torch

from megarnn.config import ModelConfig
from megarnn.errors import MegarnnError

CONFIG_KEY = "megarnn_model"


class ExportError(MegarnnError):
    """The checkpoint cannot be exported in the requested format."""


def mamba2_to_hf_names(c: ModelConfig) -> dict[str, str]:
    """Our parameter name -> Mamba2ForCausalLM's."""
    m = {"embed_tokens.weight": "backbone.embeddings.weight", "final_norm.weight": "backbone.norm_f.weight"}
    for i in range(c.n_layers):
        m[f"layers.{i}.norm.weight"] = f"backbone.layers.{i}.norm.weight"
        for n in ("in_proj.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"):
            m[f"layers.{i}.mixer.{n}"] = f"backbone.layers.{i}.mixer.{n}"
        m[f"layers.{i}.mixer.conv_weight"] = f"backbone.layers.{i}.mixer.conv1d.weight"
        m[f"layers.{i}.mixer.conv_bias"] = f"backbone.layers.{i}.mixer.conv1d.bias"
    if not c.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    return m


def mamba2_hf_config(c: ModelConfig, tokenizer) -> dict:
    return {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
        "num_heads": c.expand * c.d_model // c.ssm_head_dim, "head_dim": c.ssm_head_dim,
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "state_size": c.d_state,
        "num_hidden_layers": c.n_layers, "layer_norm_epsilon": c.norm_eps, "expand": c.expand,
        "conv_kernel": c.conv_width, "n_groups": c.n_groups, "use_bias": False, "use_conv_bias": True,
        "chunk_size": c.chunk_size, "tie_word_embeddings": c.tie_embeddings,
        "time_step_min": c.dt_min, "time_step_max": c.dt_max, "time_step_floor": c.dt_init_floor,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.sp.pad_id(),
        "torch_dtype": "float32",
    }


def hf_names(c: ModelConfig) -> dict[str, str]:
    _check_hf_family(c)
    return mamba2_to_hf_names(c) if c.family == "mamba2" else griffin_to_hf_names(c)


def _check_hf_family(c: ModelConfig) -> None:
    if c.family not in ("griffin", "hawk", "mamba2"):
        raise ExportError(f"model.family={c.family!r} has no Hugging Face transformers architecture; "
                          "export with --format safetensors (megarnn.load reads it)")


def hf_config(c: ModelConfig, tokenizer) -> dict:
    _check_hf_family(c)
    return mamba2_hf_config(c, tokenizer) if c.family == "mamba2" else griffin_hf_config(c, tokenizer)


def griffin_to_hf_names(c: ModelConfig) -> dict[str, str]:
    """Our parameter name -> RecurrentGemmaForCausalLM's, for every parameter of the model."""
    m = {"embed_tokens.weight": "model.embed_tokens.weight", "final_norm.weight": "model.final_norm.weight"}
    for i, kind in enumerate(c.block_types()):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        names = ["temporal_pre_norm.weight", "channel_pre_norm.weight"]
        names += [f"mlp_block.{p}_proj.{w}" for p in ("gate", "up", "down") for w in ("weight", "bias")]
        if kind == "R":
            names += [f"temporal_block.linear_{p}.{w}" for p in ("x", "y", "out") for w in ("weight", "bias")]
            names += ["temporal_block.rg_lru.recurrent_param"]
            m[ours + "temporal_block.conv_weight"] = hf + "temporal_block.conv_1d.weight"
            m[ours + "temporal_block.conv_bias"] = hf + "temporal_block.conv_1d.bias"
            for g in ("input", "recurrent"):
                for w in ("weight", "bias"):
                    m[ours + f"temporal_block.rg_lru.{g}_gate.{w}"] = hf + f"temporal_block.rg_lru.{g}_gate_{w}"
        else:
            names += [f"temporal_block.{p}_proj.weight" for p in "qkvo"] + ["temporal_block.o_proj.bias"]
        m.update({ours + n: hf + n for n in names})
    if not c.tie_embeddings:
        m["lm_head.weight"] = "lm_head.weight"
    return m


def griffin_hf_config(c: ModelConfig, tokenizer) -> dict:
    c = c.resolved()
    if c.head_dim != c.d_model // c.n_heads:
        raise ExportError(f"model.head_dim={c.head_dim}: RecurrentGemma requires head_dim = d_model / n_heads "
                          f"= {c.d_model // c.n_heads}; export with --format safetensors instead")
    return {
        "architectures": ["RecurrentGemmaForCausalLM"], "model_type": "recurrent_gemma",
        "num_hidden_layers": c.n_layers, "vocab_size": c.vocab_size, "hidden_size": c.d_model,
        "intermediate_size": 2 * c.mlp_width, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "lru_width": c.lru_width,
        "attention_window_size": c.attention_window, "conv1d_width": c.conv_width,
        "logits_soft_cap": c.logits_soft_cap, "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta,
                            "partial_rotary_factor": c.rope_fraction},
        "block_types": ["recurrent" if k == "R" else "attention" for k in c.block_pattern],
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False, "w_init_variance_scale": c.w_init_variance_scale,
        "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.sp.pad_id(),
        "torch_dtype": "float32", "use_cache": hf_cache_works(c),
    }


def hf_cache_works(c: ModelConfig) -> bool:
    """Whether transformers' default cache runs this model. RecurrentGemma's (transformers 5.x) asks
    its attention layers for the sequence length (positions, the sliding-window mask) and raises
    `get_seq_length can only be called on Attention layers` when there are none: all-recurrent
    Hawk exports say use_cache false, and generate() then reads the whole prefix for every token."""
    return c.family == "mamba2" or "A" in c.block_types()


def hf_generation_config(c: ModelConfig, tokenizer) -> dict:
    """generation_config.json: the special tokens and whether generate() may use the cache."""
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.sp.pad_id(), "use_cache": hf_cache_works(c)}


def to_hf_state_dict(model, c: ModelConfig) -> dict[str, torch.Tensor]:
    names = hf_names(c)
    out = {}
    for ours, tensor in model.state_dict().items():
        t = tensor.detach().contiguous()
        if ours.endswith("conv_weight"):
            t = t[:, None, :].contiguous()  # nn.Conv1d(groups=D) stores (D, 1, W)
        out[names[ours]] = t
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    inverse = {hf: ours for ours, hf in hf_names(c).items()}
    out = {}
    for hf, t in sd.items():
        if hf not in inverse:
            continue  # e.g. a tied lm_head.weight
        out[inverse[hf]] = t[:, 0, :] if inverse[hf].endswith("conv_weight") else t
    return out


def hf_config_to_model_config(hf: dict) -> ModelConfig:
    if hf["model_type"] == "mamba2":
        return ModelConfig(
            family="mamba2", block_pattern="M", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"], d_state=hf["state_size"], expand=hf["expand"],
            ssm_head_dim=hf["head_dim"], n_groups=hf["n_groups"], chunk_size=hf["chunk_size"],
            conv_width=hf["conv_kernel"], norm_eps=hf["layer_norm_epsilon"],
            tie_embeddings=hf.get("tie_word_embeddings", False))
    return griffin_config_from_hf(hf)


def griffin_config_from_hf(hf: dict) -> ModelConfig:
    letters = "".join("R" if b == "recurrent" else "A" for b in hf["block_types"])
    rope = hf.get("rope_parameters") or {}
    return ModelConfig(
        family="griffin" if "A" in letters else "hawk", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], block_pattern=letters, n_heads=hf["num_attention_heads"],
        n_kv_heads=hf["num_key_value_heads"], lru_width=hf["lru_width"], conv_width=hf["conv1d_width"],
        attention_window=hf["attention_window_size"], mlp_width=hf["intermediate_size"] // 2,
        logits_soft_cap=hf["logits_soft_cap"], rope_theta=rope.get("rope_theta", 10000.0),
        rope_fraction=rope.get("partial_rotary_factor", 0.5), norm_eps=hf["rms_norm_eps"],
        tie_embeddings=hf.get("tie_word_embeddings", True))
