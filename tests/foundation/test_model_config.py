"""Model config: presets (the released models' config.json), loaders, RoPE scaling, and errors that name the field."""

import json
import math
from pathlib import Path

import pytest

from gates.model_config import (PRESETS, ConfigError, LongRope, from_hf_config, from_toml, load, preset,
                                to_hf_minicpm_config)

RELEASED = Path(__file__).resolve().parents[2] / "gates" / "data" / "released"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "minicpm4-released"


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
    # the 8B engine issue's anchors: 13.985 GFLOP/token at 8 of the 8B's 32 layers
    eight = PRESETS["minicpm4-8b-8l"]
    assert eight.flops_per_token(4096) == pytest.approx(13.985e9, rel=1e-4)
    assert eight.model_copy(update={"num_layers": 32}) == PRESETS["minicpm4-8b"].model_copy(update={"name": eight.name})


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
    values = {k: v for k, v in preset("tiny").model_dump(exclude={"name"}).items() if v is not None}
    path = tmp_path / "m.toml"
    path.write_text('name = "mine"\n' + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "\n")
    cfg = from_toml(path)
    assert cfg.name == "mine" and cfg.hidden_size == 64


def test_toml_preset_override(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[model]\npreset = "tiny"\nnum_layers = 3\n')
    cfg = from_toml(path)
    assert cfg.num_layers == 3 and cfg.hidden_size == 64


def _released(name: str) -> dict:
    return json.loads((RELEASED / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["minicpm4-0.5b", "minicpm4-8b"])
def test_presets_are_the_released_configs(name):
    """The shipped files are the published config.json (byte for byte where shared/ has them), and the
    preset maps every math key of it: LongRoPE factors, eps, tying, padding."""
    if (SHARED / f"{name}.config.json").is_file():
        assert (RELEASED / f"{name}.json").read_bytes() == (SHARED / f"{name}.config.json").read_bytes()
    raw, cfg = _released(name), preset(name)
    rope = raw["rope_scaling"]
    assert cfg.rope_scaling == LongRope(short_factor=rope["short_factor"], long_factor=rope["long_factor"],
                                        original_max_position_embeddings=rope["original_max_position_embeddings"])
    assert cfg.rms_norm_eps == raw["rms_norm_eps"] and cfg.max_seq_length == raw["max_position_embeddings"]
    assert cfg.tie_word_embeddings == raw.get("tie_word_embeddings", True)
    assert cfg.pad_token_id == raw.get("pad_token_id")
    assert len(cfg.rope_scaling.short_factor) == cfg.dim_head // 2


def test_released_values_in_numbers():
    small, big = preset("minicpm4-0.5b"), preset("minicpm4-8b")
    assert (small.rms_norm_eps, big.rms_norm_eps, small.pad_token_id, big.pad_token_id) == (1e-5, 1e-6, None, 2)
    assert small.rope_scaling.short_factor[0] == pytest.approx(1.0004360675811768)
    assert small.rope_scaling.short_factor[-1] == pytest.approx(49.85338592529297)
    assert big.rope_scaling.short_factor[-1] == pytest.approx(31.02392307921529)
    # max_position_embeddings == original: the short factors at every length, cos/sin unscaled
    for seq in (1, 4096, 32768):
        assert small.rope_at(seq) == (small.rope_scaling.short_factor, 1.0)
    assert preset("tiny").rope_at(4096) == (None, 1.0)


def test_longrope_beyond_the_original_length():
    """long_factor once the sequence exceeds original_max_position_embeddings; cos/sin scaled by
    sqrt(1 + ln(max / original) / ln(original)) when max_seq_length exceeds it."""
    rope = LongRope(short_factor=[1.0] * 8, long_factor=[2.0] * 8, original_max_position_embeddings=256)
    cfg = preset("tiny").model_copy(update={"rope_scaling": rope})  # head_dim 16, max_seq_length 1024
    scale = math.sqrt(1 + math.log(4) / math.log(256))
    assert cfg.rope_at(256) == ((1.0,) * 8, scale)
    assert cfg.rope_at(257) == ((2.0,) * 8, scale)


@pytest.mark.parametrize("rope, message", [
    ({"type": "longrope", "short_factor": [1.0] * 7, "long_factor": [1.0] * 8, "original_max_position_embeddings": 64},
     "rope_scaling.short_factor needs head_dim / 2 = 8"),
    ({"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [0.0] * 8, "original_max_position_embeddings": 64},
     "rope_scaling.long_factor needs"),
    ({"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8, "original_max_position_embeddings": 4096},
     "max_seq_length \\(1024\\) must be at least"),
    ({"type": "linear", "factor": -1.0}, "rope_scaling.linear.factor"),
    ({"type": "yarn", "factor": 2.0}, "rope_scaling"),
])
def test_bad_rope_scaling_names_the_field(rope, message):
    values = preset("tiny").model_dump(exclude={"name"}) | {"rope_scaling": rope}
    with pytest.raises(ConfigError, match=message):
        from gates.model_config import _build
        _build("t", values)


def test_pad_token_id_must_be_a_row():
    with pytest.raises(ConfigError, match="pad_token_id \\(4096\\) must be below vocab_size"):
        from gates.model_config import _build
        _build("t", preset("tiny").model_dump(exclude={"name"}) | {"pad_token_id": 4096})


def _write(tmp_path, hf: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path


def test_hf_config_json(tmp_path):
    cfg, ignored = from_hf_config(_write(tmp_path, _released("minicpm4-0.5b")))
    assert cfg.model_dump(exclude={"name"}) == preset("minicpm4-0.5b").model_dump(exclude={"name"})
    assert "torch_dtype" in ignored and "auto_map" in ignored and "rope_scaling" not in ignored
    hf = _released("minicpm4-0.5b") | {"num_key_value_heads": 5}
    with pytest.raises(ConfigError, match="num_kv_heads"):
        from_hf_config(_write(tmp_path, hf))


@pytest.mark.parametrize("name", ["minicpm4-0.5b", "minicpm4-8b", "tiny"])
def test_to_hf_minicpm_config_round_trips(tmp_path, name):
    cfg = preset(name)
    back, _ = from_hf_config(_write(tmp_path, to_hf_minicpm_config(cfg)))
    assert back.differences(cfg) == []
    assert back.model_copy(update={"rope_theta": 5e5}).differences(cfg) == ["rope_theta: 500000.0 vs 10000.0"]


def test_hf_rope_forms(tmp_path):
    """rope_type or type; transformers 5's rope_parameters; linear; the default type is plain RoPE."""
    base = to_hf_minicpm_config(preset("tiny"))
    rope = {"type": "longrope", "short_factor": [1.5] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 1024}
    cfg, _ = from_hf_config(_write(tmp_path, base | {"rope_parameters": rope | {"rope_theta": 10000.0}}))
    assert cfg.rope_scaling.short_factor == (1.5,) * 8
    cfg, _ = from_hf_config(_write(tmp_path, base | {"rope_scaling": {"rope_type": "linear", "factor": 4}}))
    assert cfg.rope_at(10) == ((4.0,) * 8, 1.0)
    cfg, _ = from_hf_config(_write(tmp_path, base | {"rope_scaling": {"rope_type": "default"}}))
    assert cfg.rope_scaling is None


@pytest.mark.parametrize("update, message", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not implemented"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope type 'yarn' is not implemented"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
                       "original_max_position_embeddings": 1024, "attention_factor": 1.3}},
     "rope_scaling.attention_factor: not implemented"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
                       "original_max_position_embeddings": 512, "factor": 3.0}}, "rope_scaling.factor \\(3.0\\)"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "default"}},
     "rope_scaling and rope_parameters disagree"),
    ({"hidden_act": "gelu"}, "hidden_act = 'gelu': only 'silu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"model_type": "llama"}, "model_type = 'llama': only 'minicpm'"),
    ({"sparse_config": {"kernel_size": 32}}, "sparse_config"),
    ({"use_mup": False}, "use_mup"),
    ({"sliding_window": 4096}, "sliding_window: unknown key"),
])
def test_hf_keys_that_change_unimplemented_math_are_refused(tmp_path, update, message):
    hf = to_hf_minicpm_config(preset("tiny")) | update
    with pytest.raises(ConfigError, match=message):
        from_hf_config(_write(tmp_path, hf))


def test_every_refused_key_is_named_at_once(tmp_path):
    hf = to_hf_minicpm_config(preset("tiny")) | {"hidden_act": "relu", "foo": 1, "bar": 2}
    with pytest.raises(ConfigError) as e:
        from_hf_config(_write(tmp_path, hf))
    assert all(k in str(e.value) for k in ("hidden_act", "foo: unknown key", "bar: unknown key"))


def test_load_errors():
    with pytest.raises(ConfigError, match="neither a preset"):
        load("no-such-model")
    with pytest.raises(ConfigError, match="not found"):
        load("/nonexistent/model.toml")
