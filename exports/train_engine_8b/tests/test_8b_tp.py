"""Tensor (and data) parallelism on the CPU over gloo: the parallel model's one training step equals the plain
model's on the whole batch. Measured by tp8b_worker (spawned processes); the jobs draw fresh seeds each run.

Tolerances (relative to the plain run's largest magnitude):
- float64 loss and gradients: 1e-12 (the sharded GEMMs and collectives only reorder fp64 sums: ~1e-14 seen);
- float64 AdamW update: 1e-7 (fp32 rounding). Adam's first update is g / (|g| + eps): an element with |g| near
  eps = 1e-8 multiplies a 1e-18 gradient difference by up to 1 / eps (~1e-9 seen);
- float32 loss and gradients: 1e-5 (~2e-6 seen); its AdamW update is not compared element-wise, because the
  same 1 / eps gain turns fp32 gradient rounding into O(lr) differences on near-zero gradients.
"""

import pytest
import torch

from tp8b_worker import spawn
from train_engine_8b.model_config import preset
from train_engine_8b.parallelize import ParallelDims, ParallelError, check_tp

TP_SHARDED = {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              *(f"model.layers.{i}.{n}.weight" for i in range(2) for n in (
                  "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))}


def _seed() -> int:
    return int(torch.randint(0, 2**30, ()))


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """In one 2-process spawn: one TP=2 step in float64; the refusals (a TP degree that splits a KV head, a
    sequence TP does not divide, compile with recompute under TP); DCP saves resharded across TP layouts."""
    tmp = tmp_path_factory.mktemp("tp2")
    return spawn([dict(name="tp2", dp=1, tp=2, dtype="float64", seq=32, seed=_seed()),
                  dict(name="bad", kind="refusal", dp=1, tp=2, model={"num_heads": 16, "num_kv_heads": 1}),
                  dict(name="odd", kind="refusal", dp=1, tp=2, seq=31),
                  dict(name="compile-recompute", kind="refusal", dp=1, tp=2, compile=True, recompute="layer"),
                  dict(name="tp2-to-tp1", kind="reshard", seed=_seed(), layouts=[[1, 2], [2, 1]]),
                  dict(name="tp1-to-tp2", kind="reshard", seed=_seed(), layouts=[[2, 1], [1, 2]]),
                  dict(name="8b", kind="shapes", preset="minicpm4-8b", dp=1, tp=2)],
                 world=2, tmp=tmp) | {"_dir": tmp}


def _assert_equal_step(r: dict, bound: float, step_bound: float | None) -> None:
    assert r["loss"] > 1.0  # a real loss on random tokens (~ln V), not a zero
    assert r["loss_rel_diff"] < bound
    bad = {k: v for k, v in r["grad_rel_diff"].items() if not v < bound}
    assert not bad, f"gradients differ from the plain model's: {bad}"
    if step_bound is not None:
        bad = {k: v for k, v in r["step_rel_diff"].items() if not v < step_bound}
        assert not bad, f"AdamW updates differ from the plain model's: {bad}"


def test_tp2_shards_every_weight(tp2):
    r = tp2["tp2"]
    assert set(r["sharded"]) == TP_SHARDED
    cfg = preset("minicpm4-8b-reduced")
    assert r["local_q_proj_rows"] == cfg.num_heads // 2 * cfg.dim_head  # 16 query heads per rank
    assert r["local_k_proj_rows"] == cfg.num_kv_heads // 2 * cfg.dim_head  # 1 KV head per rank


def test_released_8b_shards_at_tp2(tp2):
    """The released 8B on meta at TP=2: one KV head (128 rows of k/v_proj) and 16 query heads per rank, half the
    vocabulary and half the SwiGLU width; norms whole (replicated, their inputs sequence-sharded)."""
    shapes = {k: tuple(map(tuple, v)) for k, v in tp2["8b"].items()}
    assert len(shapes) == 2 + 32 * 9 + 1
    layer = "model.layers.31."
    assert shapes[layer + "self_attn.q_proj.weight"] == ((4096, 4096), (2048, 4096))
    assert shapes[layer + "self_attn.k_proj.weight"] == ((256, 4096), (128, 4096))
    assert shapes[layer + "self_attn.v_proj.weight"] == ((256, 4096), (128, 4096))
    assert shapes[layer + "self_attn.o_proj.weight"] == ((4096, 4096), (4096, 2048))
    assert shapes[layer + "mlp.gate_proj.weight"] == ((16384, 4096), (8192, 4096))
    assert shapes[layer + "mlp.down_proj.weight"] == ((4096, 16384), (4096, 8192))
    assert shapes["model.embed_tokens.weight"] == ((73448, 4096), (36724, 4096))
    assert shapes["lm_head.weight"] == ((73448, 4096), (36724, 4096))
    assert shapes[layer + "input_layernorm.weight"] == ((4096,), (4096,))


def test_tp2_step_equals_tp1_float64(tp2):
    _assert_equal_step(tp2["tp2"], bound=1e-12, step_bound=1e-7)


def test_tp2_hf_state_dict_round_trip_is_exact(tp2):
    """load_hf shards full weights and to_hf gathers them back bit for bit."""
    assert tp2["tp2"]["round_trip_exact"]


def test_tp2_hf_export_reproduces_logits_in_transformers(tp2, tmp_path_factory):
    """The TP model's gathered state dict (after its step), folded, gives transformers' LlamaForCausalLM the
    TP model's own logits (1e-5: transformers' fp32 RoPE angles, test_8b_model.py)."""
    transformers = pytest.importorskip("transformers")
    from train_engine_8b.minicpm.hf_fold import fold_to_llama, llama_config_dict

    cfg = preset("minicpm4-8b-reduced")
    saved = torch.load(tp2["_dir"] / "tp2.pt")
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config_dict(cfg))).double().eval()
    llama.load_state_dict(fold_to_llama(cfg, saved["state"]), strict=True)
    with torch.no_grad():
        got = llama(input_ids=saved["ids"]).logits
    assert float((got - saved["logits"]).norm() / saved["logits"].norm()) < 1e-5


def test_tp2_padding_row_gets_no_gradient(tp2):
    r = tp2["tp2"]
    assert r["pad_row_grad_nonzero"] == 0 and r["pad_row_moved"] == 0
    assert r["nonpad_rows_with_grad"] > 10  # the other looked-up rows do get gradients


def test_tp_degree_that_splits_a_kv_head_is_refused(tp2):
    assert "tensor parallel degree 2 does not divide num_kv_heads (1)" in tp2["bad"]["error"]


def test_sequence_that_tp_does_not_divide_is_refused(tp2):
    assert "sequence length 31 is not a multiple of the tensor parallel degree 2" in tp2["odd"]["error"]


def test_compile_with_recompute_under_tp_is_refused(tp2):
    assert "compile with recompute='layer' under tensor parallelism is not supported" in tp2["compile-recompute"]["error"]


@pytest.mark.parametrize("job", ["tp2-to-tp1", "tp1-to-tp2"])
def test_dcp_checkpoint_reshards_across_tp_layouts(tp2, job):
    """The model's DTensor state dict saved by torch.distributed.checkpoint at one TP degree loads bit for bit
    at another (the core's checkpoints build on this)."""
    assert tp2[job]["exact"]
    assert tp2[job]["dst_sharded"] == (len(TP_SHARDED) if job.endswith("tp2") else 0)


def test_check_tp_names_the_field():
    cfg = preset("minicpm4-8b")
    check_tp(cfg, 2)
    with pytest.raises(ParallelError, match=r"degree 4 does not divide num_kv_heads \(2\).*1, 2"):
        check_tp(cfg, 4)
    with pytest.raises(ParallelError, match="degree 3 does not divide num_kv_heads"):
        check_tp(cfg, 3)
    with pytest.raises(ParallelError, match="untied lm_head"):
        check_tp(cfg.model_copy(update={"tie_word_embeddings": True}), 2)
    with pytest.raises(ParallelError, match="must equal the world size"):
        ParallelDims(dp=2, tp=2).check(cfg, world_size=8)


@pytest.mark.slow
def test_dp2_fp32_and_recompute(tmp_path):
    """DP=2 (float64), TP=2 in float32, and TP=2 with layer recomputation (float64)."""
    r = spawn([dict(name="dp2", dp=2, tp=1, dtype="float64", seq=32, seed=_seed()),
               dict(name="tp2-fp32", dp=1, tp=2, dtype="float32", seq=32, seed=_seed()),
               dict(name="tp2-recompute", dp=1, tp=2, dtype="float64", seq=24, seed=_seed(), recompute="layer")],
              world=2, tmp=tmp_path)
    _assert_equal_step(r["dp2"], bound=1e-12, step_bound=1e-7)
    assert r["dp2"]["sharded"] == []
    _assert_equal_step(r["tp2-fp32"], bound=1e-5, step_bound=None)
    _assert_equal_step(r["tp2-recompute"], bound=1e-12, step_bound=1e-7)
    assert all(r[k]["pad_row_grad_nonzero"] == 0 for k in r)


@pytest.mark.slow
def test_tp2_compiled_layers(tmp_path):
    """TP=2 with every decoder layer compiled (inductor on the CPU; ~1 min). Twice in one process: the second
    model runs from the compile caches the first one filled."""
    r = spawn([dict(name=f"tp2-compiled-{i}", dp=1, tp=2, dtype="float64", seq=32, seed=_seed(), compile=True)
               for i in range(2)], world=2, tmp=tmp_path)
    for result in r.values():
        _assert_equal_step(result, bound=1e-12, step_bound=1e-7)


@pytest.mark.slow
def test_dp2_x_tp2_on_four_ranks(tmp_path):
    r = spawn([dict(name="dp2xtp2", dp=2, tp=2, dtype="float64", seq=32, seed=_seed())], world=4, tmp=tmp_path)
    _assert_equal_step(r["dp2xtp2"], bound=1e-12, step_bound=1e-7)
    assert set(r["dp2xtp2"]["sharded"]) == TP_SHARDED and r["dp2xtp2"]["pad_row_grad_nonzero"] == 0
