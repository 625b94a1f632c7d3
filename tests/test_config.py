import pytest

from megarnn.config import ModelConfig, load_config
from megarnn.errors import ConfigError


def test_quickstart_config_loads_with_model_file_and_overrides():
    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=7", "train.lr=1e-3", "model.d_model=64"])
    assert cfg.train.max_steps == 7
    assert cfg.train.lr == 1e-3  # PyYAML reads 1e-3 as a string; the float field converts it
    assert cfg.model.d_model == 64 and cfg.model.block_pattern == "RRA"  # from model/griffin-small.yaml


def test_override_replaces_model_file():
    cfg = load_config("configs/quickstart.yaml", ["model=configs/model/griffin-tiny.yaml", "model.n_layers=2"])
    assert cfg.model.d_model == 32 and cfg.model.n_layers == 2


def test_unknown_key_names_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*did you mean 'train.max_steps'"):
        load_config("configs/quickstart.yaml", ["train.max_step=10"])


def test_unknown_section_names_nearest():
    with pytest.raises(ConfigError, match="did you mean 'parallel'"):
        load_config("configs/quickstart.yaml", ["paralel.tp=2"])


@pytest.mark.parametrize("item,expect", [
    ("train.max_steps=ten", "expected an integer"),
    ("train.lr=fast", "expected a number"),
    ("model.tie_embeddings=maybe", "expected true or false"),
    ("data.train_files={a: 1}", "expected a list"),
])
def test_wrong_type_is_rejected(item, expect):
    with pytest.raises(ConfigError, match=expect):
        load_config("configs/quickstart.yaml", [item])


def test_sizes_that_must_divide_are_checked():
    with pytest.raises(ConfigError, match=r"model.d_model=100 must be divisible by model.n_heads=3"):
        load_config("configs/quickstart.yaml", ["model.d_model=100", "model.n_heads=3"])


def test_layouts_that_cannot_work_are_refused_with_a_fix():
    with pytest.raises(ConfigError, match="ZeRO stages 0 and 1 only.*set parallel.zero_stage=1"):
        load_config("configs/quickstart.yaml", ["parallel.pp=2", "parallel.zero_stage=2"])
    with pytest.raises(ConfigError, match="parallel.pp=9 is more pipeline stages than model.n_layers"):
        load_config("configs/quickstart.yaml", ["parallel.pp=9", "model.n_layers=6"])
    with pytest.raises(ConfigError, match="pp_balance='2,2'.*adding up to model.n_layers=6, e.g. 3,3"):
        load_config("configs/quickstart.yaml", ["parallel.pp=2", "model.n_layers=6", "parallel.pp_balance=2,2"])
    with pytest.raises(ConfigError, match="parallel.tp=3 does not divide model.n_heads=4"):
        load_config("configs/quickstart.yaml", ["parallel.tp=3"])


def test_bad_override_syntax_and_missing_file():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("configs/quickstart.yaml", ["train.max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=3"])
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p).to_dict() == cfg.to_dict()


def test_model_config_from_yaml_derives_sizes():
    c = ModelConfig.from_yaml("configs/model/griffin-tiny.yaml").resolved()
    assert (c.head_dim, c.lru_width, c.mlp_width) == (16, 32, 96)
    assert ModelConfig(n_layers=5, block_pattern="RRA").block_types() == list("RRARR")


def test_sequence_must_split_across_context_parallel_ranks():
    with pytest.raises(ConfigError, match=r"data.seq_len=100 must be divisible by parallel.cp=3"):
        load_config("configs/quickstart.yaml", ["data.seq_len=100", "parallel.cp=3"])
