"""Continued pretraining from released MiniCPM4 checkpoints: `pretrain --init-from DIR` on directories laid out as
OpenBMB publishes them (the released config.json at reduced size, weights in bf16 under the released key names,
as one safetensors file, a sharded index, pytorch_model.bin or a sharded .bin index), the tokenizer the directory
carries, refusals that name what is wrong, and the native round trip (`export-hf --layout minicpm`, then
`--init-from` it: the checkpoint's weights exactly)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from engine_testlib import read_log
from safetensors.torch import save_file

from train_engine_0_5b.core import checkpoint as ckpt
from train_engine_0_5b.core.errors import EngineError
from train_engine_0_5b.data.tokenizer import DEFAULT_DIR, TextTokenizer
from train_engine_0_5b.init_from import load_init, tokenizer_dir
from train_engine_0_5b.model_config import MiniCPMConfig, from_hf_config, hf_param_shapes

RELEASED = Path(__file__).resolve().parents[1] / "src" / "train_engine_0_5b" / "data" / "released"
FIXTURES = Path(__file__).resolve().parent / "data" / "released"  # configs this engine does not ship (8B)
# Reduced width and depth; head dim 64 (0.5B) / 128 (8B) so the released factor lists apply as published;
# vocabulary = the shipped tokenizer's, which these directories carry.
REDUCED = {"minicpm4-0.5b": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1),
           "minicpm4-8b": dict(hidden_size=256, num_attention_heads=2, num_key_value_heads=1)}
LAYOUTS = ("safetensors", "sharded", "bin", "sharded-bin")
SEQ, ROWS = 48, 2


def official_dir(root: Path, release: str, layout: str, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """An official-layout directory: the released config.json with reduced sizes (every other key as published),
    bf16 weights under the released key names; returns it and the weights (float32)."""
    source = (RELEASED if (RELEASED / f"{release}.json").is_file() else FIXTURES) / f"{release}.json"
    config = json.loads(source.read_text()) | REDUCED[release] | dict(
        num_hidden_layers=2, intermediate_size=192, vocab_size=4096)
    d = root / f"{release}-{layout}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    cfg, _ = from_hf_config(d)
    gen = torch.Generator().manual_seed(seed)
    weights = {k: (torch.randn(s, generator=gen) * (0.3 if len(s) > 1 else 0.1) + (len(s) == 1)).to(torch.bfloat16)
               for k, s in hf_param_shapes(cfg).items()}
    files = dict(weights)
    if cfg.tie_word_embeddings and layout == "bin":  # a tied checkpoint may carry the head as well
        files["lm_head.weight"] = files["model.embed_tokens.weight"].clone()
    names = list(files)
    parts = [dict(files)] if layout in ("safetensors", "bin") else [
        {k: files[k] for k in names[: len(names) // 2]}, {k: files[k] for k in names[len(names) // 2:]}]
    suffix = "safetensors" if "bin" not in layout else "bin"
    if len(parts) == 1:
        _write(parts[0], d / ("model.safetensors" if suffix == "safetensors" else "pytorch_model.bin"))
    else:
        stem = "model" if suffix == "safetensors" else "pytorch_model"
        shards = [f"{stem}-{i + 1:05d}-of-{len(parts):05d}.{suffix}" for i in range(len(parts))]
        for shard, part in zip(shards, parts):
            _write(part, d / shard)
        index = {"metadata": {"total_size": sum(t.numel() * 2 for t in files.values())},
                 "weight_map": {k: shard for shard, part in zip(shards, parts) for k in part}}
        (d / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2))
    return d, {k: v.float() for k, v in weights.items()}


def _write(tensors: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".bin":
        torch.save(tensors, path)
    else:
        save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("release", ["minicpm4-0.5b", "minicpm4-8b"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_official_layouts_load(tmp_path, release, layout):
    d, weights = official_dir(tmp_path, release, layout)
    cfg, loaded = load_init(d)
    assert list(loaded) == list(hf_param_shapes(cfg))
    for name, w in weights.items():
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], w), name
    assert cfg.rope_scaling is not None and cfg.rope_scaling.type == "longrope"
    assert (cfg.pad_token_id, cfg.tie_word_embeddings) == ((2, False) if release == "minicpm4-8b" else (None, True))
    assert cfg.rms_norm_eps == (1e-6 if release == "minicpm4-8b" else 1e-5)


def test_a_missing_shard_or_tensor_is_named(tmp_path):
    d, _ = official_dir(tmp_path, "minicpm4-0.5b", "sharded")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(EngineError, match="shard model-00002-of-00002.safetensors named by model.safetensors.index.json is missing"):
        load_init(d)
    d, weights = official_dir(tmp_path / "b", "minicpm4-0.5b", "safetensors")
    del weights["model.norm.weight"]
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(d / "model.safetensors"))
    with pytest.raises(EngineError, match="missing \\['model.norm.weight'\\]"):
        load_init(d)


def _batches(path: Path, steps: int = 1) -> Path:
    ids = torch.randint(0, 4096, (steps, ROWS, SEQ), generator=torch.Generator().manual_seed(5))
    labels = torch.roll(ids, -1, dims=2)
    labels[:, :, -1] = -100
    save_file({"input_ids": ids, "labels": labels}, str(path))
    return path


def _with_tokenizer(d: Path) -> Path:
    """The shipped tokenizer, told apart by one more tokenizer_config.json field: the run must carry this one."""
    shutil.copy(DEFAULT_DIR / "tokenizer.json", d / "tokenizer.json")
    config = json.loads((DEFAULT_DIR / "tokenizer_config.json").read_text()) | {"model_max_length": 32768}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def _pretrain(cli, d: Path, tmp_path: Path, *extra):
    args = ["pretrain", "--init-from", d, "--token-batches", _batches(tmp_path / "batches.safetensors"),
            "--num-steps", 1, "--global-batch-size", ROWS, "--micro-batch-size", ROWS, "--seq-length", SEQ,
            "--device", "cpu", "--warmup-steps", 1, "--save-dir", tmp_path / "save", "--log-file", tmp_path / "log.jsonl",
            *extra]
    return cli(args)


@pytest.mark.parametrize("release, layout", [("minicpm4-0.5b", "sharded"), ("minicpm4-8b", "safetensors")])
def test_pretrain_continues_from_an_official_checkpoint(cli, tmp_path, release, layout):
    """The run carries the directory's tokenizer, and the native export gives the weights back (the first step's
    loss against the workspace's reference: the workspace's tests/engines/test_engine_init_from_reference.py)."""
    d, weights = official_dir(tmp_path, release, layout)
    _with_tokenizer(d)
    res = _pretrain(cli, d, tmp_path)
    assert res.exit_code == 0, res.output + res.stderr
    cfg, _ = from_hf_config(d)
    assert len(read_log(tmp_path / "log.jsonl")) == 1
    saved = ckpt.load(tmp_path / "save")
    assert TextTokenizer(saved.path / ckpt.TOKENIZER_DIR).fingerprint == TextTokenizer(d).fingerprint
    assert TextTokenizer(d).fingerprint != TextTokenizer().fingerprint

    out = tmp_path / "native"
    res = cli(["export-hf", "--checkpoint", tmp_path / "save", "--out", out, "--layout", "minicpm"])
    assert res.exit_code == 0, res.output + res.stderr
    back_cfg, back = load_init(out)
    assert back_cfg.differences(MiniCPMConfig(**saved.state["config"]["model"])) == []
    assert back_cfg.differences(cfg) == []
    assert set(back) == set(saved.master) and all(torch.equal(back[k], saved.master[k]) for k in back)
    assert tokenizer_dir(out) == out and TextTokenizer(out).fingerprint == TextTokenizer(d).fingerprint


def test_a_config_key_with_unimplemented_math_is_refused(cli, tmp_path):
    d, _ = official_dir(tmp_path, "minicpm4-0.5b", "safetensors")
    config = json.loads((d / "config.json").read_text()) | {"hidden_act": "gelu", "sparse_config": {"kernel_size": 32}}
    (d / "config.json").write_text(json.dumps(config))
    res = _pretrain(cli, d, tmp_path)
    assert res.exit_code == 1 and "hidden_act = 'gelu'" in res.stderr and "sparse_config" in res.stderr, res.stderr
    assert not (tmp_path / "save").exists()


def test_another_model_than_model_is_refused_naming_the_differences(cli, tmp_path):
    d, _ = official_dir(tmp_path, "minicpm4-0.5b", "safetensors")
    res = _pretrain(cli, d, tmp_path, "--model", "tiny")
    assert res.exit_code == 1, res.output
    assert "describes another model than --model tiny" in res.stderr
    assert "rms_norm_eps: 1e-05 vs 1e-06" in res.stderr and "rope_scaling:" in res.stderr
    assert not (tmp_path / "save").exists()


def test_sentencepiece_tokenizer_through_transformers(tmp_path):
    """A directory with only a sentencepiece tokenizer.model (as MiniCPM's releases carry beside tokenizer.json)."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("transformers")
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"def f{i}(x): return x * {i}  # MiniCPM continued pretraining" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "spm"), vocab_size=120,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(tmp_path / "spm.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "eos_token": "</s>",
                                                         "bos_token": "<s>", "unk_token": "<unk>"}))
    assert tokenizer_dir(d) == d
    tok = TextTokenizer(d)
    ids = tok.encode_batch(["def f7(x): return x * 7"])[0]
    processor = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert tok.eos_id == 2 and ids == processor.encode("def f7(x): return x * 7")
    assert tok.vocab_size <= 120


def test_no_tokenizer_in_the_directory_keeps_the_shipped_one(tmp_path):
    d, _ = official_dir(tmp_path, "minicpm4-0.5b", "safetensors")
    assert tokenizer_dir(d) is None
