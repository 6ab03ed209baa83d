"""`--init-from` read lazily (issue 29): at TP=2 each rank reads only its shard of every weight (safetensors
slices: column-parallel weights' rows, row-parallel weights' columns, the vocab-parallel embedding's and
lm_head's vocab rows; the replicated norms whole), and what it holds equals its shard of the whole read bit
for bit. Measured on spawned gloo ranks by init8b_worker; the refusals of bad directories in this process.

The share is counted twice: by the reader (`HFWeights.bytes_read`) and by a wrapper around safetensors'
`safe_open` that adds up every tensor it hands out; both must equal the rank's share computed here from the
shapes and the TP plan alone (a whole read would count every byte: 2x on every sharded weight).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import init8b_worker as worker
from train_engine_8b.core.errors import EngineError
from train_engine_8b.minicpm.config import hf_param_shapes
from train_engine_8b.minicpm.hf_config import to_hf_minicpm_config
from train_engine_8b.minicpm.init_from import load_init, open_init
from train_engine_8b.model_config import preset

ROW_PARALLEL = ("o_proj", "down_proj")  # split along the input (columns); every other matrix along its rows


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_dir(d: Path, *, layout: str = "sharded", cfg=None, seed: int = 0, edit=None) -> Path:
    """A HF MiniCPM directory of the reduced 8B: random bf16 weights (norms around 1), safetensors in two files
    with an index ("sharded"), one file ("safetensors") or pytorch_model.bin ("bin"); `edit(weights)` first."""
    cfg = cfg or preset("minicpm4-8b-reduced")
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(to_hf_minicpm_config(cfg), indent=2))
    gen = torch.Generator().manual_seed(seed)
    weights = {k: (torch.randn(s, generator=gen) * (0.3 if len(s) > 1 else 0.1) + (len(s) == 1)).to(torch.bfloat16)
               for k, s in hf_param_shapes(cfg).items()}
    if edit is not None:
        edit(weights)
    if layout == "bin":
        torch.save(weights, d / "pytorch_model.bin")
    elif layout == "safetensors":
        save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = list(weights)
        parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                 "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for f, part in parts.items():
            save_file({k: weights[k] for k in part}, str(d / f), metadata={"format": "pt"})
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: f for f, part in parts.items() for k in part}}))
    return d


def share(cfg, tp: int) -> int:
    """Bytes of bf16 data one rank keeps at `tp`: 1 / tp of every matrix, every (replicated) norm whole."""
    return sum(2 * torch.Size(s).numel() // (tp if len(s) == 2 else 1) for s in hf_param_shapes(cfg).values())


def total(cfg) -> int:
    return sum(2 * torch.Size(s).numel() for s in hf_param_shapes(cfg).values())


def _nan_in_second_half(weights):
    """A NaN in the rows rank 1 of TP=2 reads (a column-parallel weight's second half) and nowhere else."""
    w = weights["model.layers.1.self_attn.q_proj.weight"]
    w[w.shape[0] - 1, 0] = float("nan")


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """The jobs on 2 spawned ranks (TP=2) and the directories they read."""
    root = tmp_path_factory.mktemp("init8b")
    seed = int(torch.randint(0, 2**30, ()))
    dirs = {"sharded": hf_dir(root / "sharded", seed=seed), "bin": hf_dir(root / "bin", layout="bin", seed=seed),
            "nan": hf_dir(root / "nan", layout="safetensors", seed=seed, edit=_nan_in_second_half)}
    jobs = [dict(name="tp2", dir=str(dirs["sharded"]), tp=2),
            dict(name="tp2-bf16", dir=str(dirs["sharded"]), tp=2, dtype="bfloat16"),
            dict(name="tp2-bin", dir=str(dirs["bin"]), tp=2),
            dict(name="tp2-nan", dir=str(dirs["nan"]), tp=2)]
    return worker.spawn(jobs, world=2, out=root, port=_port()), dirs


@pytest.mark.parametrize("job", ["tp2", "tp2-bf16", "tp2-bin"])
def test_tp2_init_from_equals_the_whole_read_bitwise(tp2, job):
    results, _ = tp2
    for r in results[job]:
        assert "error" not in r, r
        assert r["params_differ"] == [] and r["masters_differ"] == [], r
    cfg = preset("minicpm4-8b-reduced")
    shapes = hf_param_shapes(cfg)
    for name, s in shapes.items():  # the shards are the TP plan's: half of every matrix, every norm whole
        assert all(r["local_numel"][name] == torch.Size(s).numel() // (2 if len(s) == 2 else 1) for r in results[job])


def test_tp2_rank_reads_only_its_share(tp2):
    results, _ = tp2
    cfg = preset("minicpm4-8b-reduced")
    mine, whole = share(cfg, 2), total(cfg)
    for r in results["tp2"]:
        assert r["bytes_read"] == mine and r["bytes_seen"] == mine, (r["rank"], r["bytes_read"], r["bytes_seen"], mine)
    assert mine < 0.51 * whole  # the norms are the only whole reads
    # a .bin cannot be read in parts: every rank loads all of it (documented), and safetensors is not touched
    for r in results["tp2-bin"]:
        assert r["bytes_read"] == whole and r["bytes_seen"] == 0, r


def test_tp2_a_non_finite_value_in_one_ranks_shard_stops_every_rank(tp2):
    results, _ = tp2
    r0, r1 = results["tp2-nan"]
    msg = "model.layers.1.self_attn.q_proj.weight is not finite floating point"
    assert msg in r1["error"] and "rank" not in r1["error"].split(msg)[1], r1
    assert msg in r0["error"] and r0["error"].endswith("(read on rank 1)"), r0


def test_region_reads_equal_slices_of_the_whole_read(tmp_path):
    """Rows, columns and a 1-D slice of every layout, through HFWeights.read, against the eager whole read."""
    for layout in ("sharded", "safetensors", "bin"):
        d = hf_dir(tmp_path / layout, layout=layout)
        _, full = load_init(d)
        _, source = open_init(d)
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight", "model.norm.weight"):
            shape = source.shape(name)
            region = tuple(slice(n // 4, n // 2) for n in shape)
            got = source.read(name, region)
            assert got.dtype == torch.float32 and torch.equal(got, full[name][region]), (layout, name)
        assert list(full) == source.names() == list(hf_param_shapes(preset("minicpm4-8b-reduced")))


def _tied(cfg_updates=None):
    return preset("minicpm4-8b-reduced").model_copy(update=dict(tie_word_embeddings=True) | (cfg_updates or {}))


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_tied_head_is_compared_on_the_rows_read(tmp_path, layout):
    cfg = _tied()

    def head(weights, bump: bool):
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
        if bump:
            weights["lm_head.weight"][-1, -1] += 1

    same = hf_dir(tmp_path / "same", layout=layout, cfg=cfg, edit=lambda w: head(w, False))
    _, source = open_init(same)
    assert "lm_head.weight" not in source.names()
    assert torch.equal(source.read("model.embed_tokens.weight"), load_init(same)[1]["model.embed_tokens.weight"])
    bad = hf_dir(tmp_path / "bad", layout=layout, cfg=cfg, edit=lambda w: head(w, True))
    _, source = open_init(bad)
    v = cfg.vocab_size
    source.read("model.embed_tokens.weight", (slice(0, v // 2), slice(None)))  # the rows that agree
    with pytest.raises(EngineError, match="ties the embeddings but lm_head.weight differs from model.embed_tokens"):
        source.read("model.embed_tokens.weight", (slice(v // 2, v), slice(None)))
    with pytest.raises(EngineError, match="ties the embeddings but lm_head.weight differs from model.embed_tokens"):
        load_init(bad)


def test_bad_directories_are_refused_naming_what_is_wrong(tmp_path):
    def drop(w):
        del w["model.norm.weight"]

    def extra(w):
        w["model.layers.0.mlp.extra.weight"] = torch.zeros(2, dtype=torch.bfloat16)

    def reshape(w):
        w["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"][:-1]

    def integer(w):
        w["model.norm.weight"] = torch.ones(w["model.norm.weight"].shape, dtype=torch.int64)

    def inf(w):
        w["model.layers.0.mlp.down_proj.weight"][0, 0] = float("inf")

    cases = {"missing": (drop, "missing \\['model.norm.weight'\\]"),
             "extra": (extra, "unexpected \\['model.layers.0.mlp.extra.weight'\\]"),
             "shape": (reshape, "model.layers.0.mlp.up_proj.weight has shape \\(511, 256\\), config.json implies \\(512, 256\\)"),
             "integer": (integer, "model.norm.weight is not finite floating point")}
    for layout in ("sharded", "bin"):
        for case, (edit, message) in cases.items():
            d = hf_dir(tmp_path / layout / case, layout=layout, edit=edit)
            with pytest.raises(EngineError, match=message):
                open_init(d)  # from the safetensors headers alone
        d = hf_dir(tmp_path / layout / "inf", layout=layout, edit=inf)
        _, source = open_init(d)  # values are checked where they are read
        with pytest.raises(EngineError, match="model.layers.0.mlp.down_proj.weight is not finite floating point"):
            load_init(d)
        source.read("model.layers.0.mlp.down_proj.weight", (slice(None), slice(256, 512)))  # the other columns
    with pytest.raises(EngineError, match="not a directory"):
        open_init(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(to_hf_minicpm_config(preset("minicpm4-8b-reduced"))))
    with pytest.raises(EngineError, match="no model.safetensors"):
        open_init(tmp_path / "empty")
    broken = hf_dir(tmp_path / "broken", layout="safetensors")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EngineError, match="cannot read"):
        open_init(broken)
