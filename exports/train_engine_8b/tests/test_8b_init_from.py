"""Initial weights at TP=2 without any rank holding the whole model (issue 29), checked bit for bit.

`--init-from` read lazily: each rank reads only its shard of every weight (safetensors slices: column-parallel
weights' rows, row-parallel weights' columns, the vocab-parallel embedding's and lm_head's vocab rows; the
replicated norms whole), and what it holds equals its shard of the whole read bit for bit. Measured on spawned
gloo ranks by init8b_worker; the refusals of bad directories in this process. The share is counted twice: by
the reader (`HFWeights.bytes_read`) and by a wrapper around safetensors' `safe_open` that adds up every tensor
it hands out; both must equal the rank's share computed here from the shapes and the TP plan alone (a whole
read would count every byte: 2x on every sharded weight).

A fresh init (minicpm/init.py `FreshWeights`): each rank draws only the row blocks of its shard from the one
generator stream, and holds exactly its shard of the whole init (`init_weights`, equal to the rule's whole draw
written out below); a wrapper around torch's allocating constructors counts a rank's reads at its share plus one
scratch block, and on the ranks the peak RSS of drawing the masters stays near the share, where the whole init
rises by the whole model.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import init8b_worker as worker
from train_engine_8b.core.dist import DistContext
from train_engine_8b.core.errors import EngineError
from train_engine_8b.core.tensor_parallel import local
from train_engine_8b.minicpm import init
from train_engine_8b.minicpm.config import hf_param_shapes
from train_engine_8b.minicpm.hf_config import to_hf_minicpm_config
from train_engine_8b.minicpm.init_from import load_init, open_init
from train_engine_8b.model_config import preset

ROW_PARALLEL = ("o_proj", "down_proj")  # split along the input (columns); every other matrix along its rows
PEAK_MODEL = dict(hidden_size=512, ffn_hidden_size=2048, vocab_size=16384)  # 128 MiB of fp32: the peak well above noise


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
    # the peak first, while the ranks' heaps hold nothing freed that the draw could reuse
    fresh = [dict(name="fresh-peak", peak=True, tp=2, model=PEAK_MODEL, block=1 << 18),
             dict(name="fresh-tp2", fresh=True, tp=2), dict(name="fresh-tp2-bf16", fresh=True, tp=2, dtype="bfloat16")]
    return worker.spawn(fresh + jobs, world=2, out=root, port=_port()), dirs


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


def whole_draw(cfg, init_std: float, seed: int) -> dict[str, torch.Tensor]:
    """The init rule written out whole: every matrix one torch.randn of its shape, in order (a seed's weights)."""
    gen = torch.Generator().manual_seed(seed)
    hidden_std = init_std / math.sqrt(cfg.hidden_size / cfg.dim_model_base)
    out = {}
    for name, shape in hf_param_shapes(cfg).items():
        if len(shape) == 1:
            out[name] = torch.ones(shape)
        else:
            std = init_std if name in ("model.embed_tokens.weight", "lm_head.weight") else hidden_std
            out[name] = torch.randn(shape, generator=gen) * std
    if cfg.pad_token_id is not None:
        out["model.embed_tokens.weight"][cfg.pad_token_id] = 0.0
    return out


def _odd_configs():
    """Widths 16 does not divide, tensors of a size 16 does not divide, and tensors under 16 values (torch's
    per-value path), untied and tied."""
    base = preset("minicpm4-8b-reduced")
    odd = dict(hidden_size=37, ffn_hidden_size=53, vocab_size=1001, head_dim=2, num_heads=4, num_kv_heads=2,
               rope_scaling=None)
    tiny = dict(hidden_size=5, ffn_hidden_size=3, vocab_size=7, head_dim=2, num_heads=2, num_kv_heads=1,
                rope_scaling=None, tie_word_embeddings=True)
    return [type(base).model_validate(base.model_copy(update=u).model_dump()) for u in (odd, tiny)]


def tp_region(name: str, shape: tuple[int, ...], rank: int, tp: int) -> tuple[slice, ...]:
    """Rank `rank`'s rectangle of `name` under the TP plan (norms whole)."""
    axis = 1 if name.split(".")[-2] in ROW_PARALLEL else 0
    if len(shape) == 1:
        return (slice(0, shape[0]),)
    n = shape[axis]
    part = slice(rank * n // tp, (rank + 1) * n // tp)
    return (part, slice(0, shape[1])) if axis == 0 else (slice(0, shape[0]), part)


def test_init_weights_is_the_whole_draw():
    for cfg in [preset("minicpm4-8b-reduced")] + _odd_configs():
        want, got = whole_draw(cfg, 0.1, 7), init.init_weights(cfg, 0.1, 7)
        assert list(got) == list(want) and [n for n in want if not torch.equal(got[n], want[n])] == [], cfg


def test_fresh_regions_equal_slices_of_the_whole_init_bitwise():
    """Rows and columns of every tensor, in blocks down to 16 values, in order and backwards; each read a tensor
    of its own (no view into a whole draw)."""
    cases = [(preset("minicpm4-8b-reduced"), 4096)] + [(cfg, b) for cfg in _odd_configs() for b in (16, 100)]
    for cfg, block in cases:
        whole, shapes = whole_draw(cfg, 0.1, 3), hf_param_shapes(cfg)
        for axis, (a, b, d) in [(0, (0, 1, 2)), (0, (1, 2, 2)), (1, (1, 2, 2)), (0, (1, 2, 3)), (1, (2, 3, 3))]:
            source = init.FreshWeights(cfg, 0.1, 3, block=block)
            for name, shape in shapes.items():
                i = axis if len(shape) > 1 else 0
                region = tuple(slice(a * n // d, b * n // d) if j == i else slice(0, n)
                               for j, n in enumerate(shape))
                got = source.read(name, region)
                assert torch.equal(got, whole[name][region]), (cfg.hidden_size, block, axis, (a, b, d), name)
                assert got.untyped_storage().nbytes() == got.numel() * 4, name
        source = init.FreshWeights(cfg, 0.1, 3, block=block)
        for name, shape in reversed(shapes.items()):
            region = (slice(1, 3),) + tuple(slice(0, n) for n in shape[1:])
            assert torch.equal(source.read(name, region), whole[name][region]), name


def test_tp1_trainer_holds_the_whole_fresh_init():
    cfg = worker.engine_config(1)
    trainer = worker.build_trainer(cfg, DistContext(), dtype=torch.float32)
    whole = whole_draw(cfg.model, cfg.train.init_std, cfg.train.seed)
    assert [n for n, p in trainer.model.named_parameters() if not torch.equal(local(p), whole[n])] == []


def test_a_ranks_fresh_reads_allocate_its_share_not_the_model(monkeypatch):
    """Every tensor torch.empty / randn / ones allocates (not an out= fill) is counted: a TP=2 rank's reads
    allocate its share and one scratch block, the whole init the whole model (so the count sees it)."""
    allocated: list[int] = []
    for fn in ("empty", "randn", "ones"):
        def counted(*args, _real=getattr(torch, fn), **kw):
            t = _real(*args, **kw)
            if kw.get("out") is None:
                allocated.append(t.numel() * t.element_size())
            return t
        monkeypatch.setattr(torch, fn, counted)
    cfg, block = preset("minicpm4-8b-reduced"), 1 << 14
    shapes = hf_param_shapes(cfg)
    for rank in range(2):
        allocated.clear()
        source = init.FreshWeights(cfg, 0.1, 0, block=block)
        mine = sum(source.read(n, tp_region(n, s, rank, 2)).numel() * 4 for n, s in shapes.items())
        assert mine == 2 * share(cfg, 2)  # fp32: twice share()'s bf16 bytes
        assert sum(allocated) <= mine + 2 * 4 * (block + 16), (rank, sum(allocated), mine)  # scratch grown once
    allocated.clear()
    init.init_weights(cfg, 0.1, 0)
    assert sum(allocated) >= 2 * total(cfg)


def test_tp2_fresh_init_equals_the_whole_init_sliced_bitwise(tp2):
    results, _ = tp2
    cfg = preset("minicpm4-8b-reduced")
    for job in ("fresh-tp2", "fresh-tp2-bf16"):
        for r in results[job]:
            assert r["params_differ"] == [] and r["masters_differ"] == [], (job, r["rank"])
            assert all(r["local_numel"][n] == torch.Size(s).numel() // (2 if len(s) == 2 else 1)
                       for n, s in hf_param_shapes(cfg).items())


def test_tp2_fresh_init_peak_rss_is_the_share_not_the_model(tp2):
    """Drawing a rank's masters raises its peak RSS by about its share (half the model) and a small block; the
    whole init it replaced by the whole model (which shows the measure sees a whole init)."""
    results, _ = tp2
    for r in results["fresh-peak"]:
        if "error" in r:
            pytest.skip(r["error"])
        model = r["model_bytes"]
        assert r["fresh_bytes"] < 0.6 * model, r
        assert r["whole_bytes"] > 0.9 * model, r
