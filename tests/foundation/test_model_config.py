"""Model config: presets, loaders, and validation errors that name the field."""

import json

import pytest

from gates.model_config import PRESETS, ConfigError, from_hf_config, from_toml, load, preset


def test_presets_match_design_table():
    small, big = preset("minicpm4-0.5b"), preset("minicpm4-8b")
    assert (small.hidden_size, small.num_layers, small.num_heads, small.num_kv_heads, small.dim_head) == (1024, 24, 16, 2, 64)
    assert (big.hidden_size, big.num_layers, big.num_heads, big.num_kv_heads, big.dim_head) == (4096, 32, 32, 2, 128)
    assert (small.ffn_hidden_size, big.ffn_hidden_size, small.vocab_size, big.vocab_size) == (4096, 16384, 73448, 73448)
    assert small.tie_word_embeddings and not big.tie_word_embeddings
    assert preset("tiny").hidden_size == 64 and preset("tiny").num_layers == 2


def test_mfu_formula_matches_measured_value():
    # MEASURED.md: 3.207 GFLOP/token for 0.5B at seq 4096.
    assert PRESETS["minicpm4-0.5b"].flops_per_token(4096) == pytest.approx(3.207e9, rel=1e-3)


@pytest.mark.parametrize(
    "override, field",
    [
        ({"num_heads": 3}, "num_heads (3) must divide hidden_size"),
        ({"num_kv_heads": 3}, "num_kv_heads (3) must divide num_heads"),
        ({"hidden_size": -8}, "hidden_size"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"bogus_key": 1}, "bogus_key: unknown key"),
    ],
)
def test_bad_values_name_the_field(tmp_path, override, field):
    values = preset("tiny").model_dump() | override
    values.pop("name")
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None)
    path = tmp_path / "m.toml"
    path.write_text(lines + "\n")
    with pytest.raises(ConfigError, match=field.replace("(", r"\(").replace(")", r"\)")):
        from_toml(path)


def test_toml_with_a_name_and_no_preset(tmp_path):
    values = preset("tiny").model_dump(exclude={"name", "head_dim"})
    path = tmp_path / "m.toml"
    path.write_text('name = "mine"\n' + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "\n")
    cfg = from_toml(path)
    assert cfg.name == "mine" and cfg.hidden_size == 64


def test_toml_preset_override(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[model]\npreset = "tiny"\nnum_layers = 3\n')
    cfg = from_toml(path)
    assert cfg.num_layers == 3 and cfg.hidden_size == 64


def test_hf_config_json(tmp_path):
    hf = {
        "model_type": "minicpm", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 2, "intermediate_size": 4096, "vocab_size": 73448, "rms_norm_eps": 1e-6,
        "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256, "tie_word_embeddings": True,
        "max_position_embeddings": 32768, "rope_scaling": {"type": "longrope"}, "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg, ignored = from_hf_config(tmp_path)
    assert cfg.model_dump(exclude={"name"}) == preset("minicpm4-0.5b").model_dump(exclude={"name"})
    assert "rope_scaling" in ignored and "torch_dtype" in ignored
    hf["num_key_value_heads"] = 5
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="num_kv_heads"):
        from_hf_config(tmp_path)


def test_load_errors():
    with pytest.raises(ConfigError, match="neither a preset"):
        load("no-such-model")
    with pytest.raises(ConfigError, match="not found"):
        load("/nonexistent/model.toml")
