"""The op registry: `OPS[op][implementation] -> callable`, and the typed selection that picks one per op.

Ops and their signatures (every implementation of an op has the same one; see each reference.py):
    attention(q, k, v) -> o                          causal GQA; q (B,S,n,d), k/v (B,S,g,d), o (B,S,n,d)
    gemm(x, weights) -> tuple of outputs             one per weight; per site: qkv, attn_out, fc1, fc2, output
    rms_norm(x, weight, eps) -> y
    add_rms_norm(x, y, weight, eps, residual_scale) -> (rms_norm(h), h),  h = x + y * residual_scale
    rope(q, k, cos, sin) -> (q, k)                   rotate-half, tables (S, d)
    qkv_rope(x, (wq, wk, wv), cos, sin) -> (q, k, v) the QKV projection and rope as one op, for fusions across
                                                     them; "unfused" = gemm.qkv then rope as selected
                                                     (ops.qkv_rope None)
    swiglu(gate, up) -> silu(gate) * up
    mlp(x, gate_w, up_w, down_w) -> y                the SwiGLU MLP as one op, for fusions across fc1 / swiglu /
                                                     fc2; "unfused" = those three ops as selected (ops.mlp None)
    cross_entropy(logits, labels) -> sum of token CE over labels != -100 (>= float32)
    linear_cross_entropy(x, weight, labels) -> cross_entropy(x @ weight^T, labels)
                                                     the output GEMM and the loss as one op, for fusions that
                                                     never hold the logits; "unfused" = gemm.output then
                                                     cross_entropy as selected (ops.linear_cross_entropy None)
    residual_scale(w, r) -> w * r                    where the residual scale r applies: "reference" = None (the
                                                     sublayer output, in add_rms_norm), "weight" = the o_proj /
                                                     down_proj weights (add_rms_norm then gets r = 1)
    adamw(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decays) -> None (in place)

An implementation lives in `ops/<folder>/<impl>.py` and defines functions named after the ops of its
folder (rmsnorm/ provides `rms_norm` and `add_rms_norm`). Built-in implementations are imported below;
the optional ones (`OPTIONAL_MODULES`, e.g. Triton kernels) are imported when present: a missing
module or a missing `triton` leaves them out and `UNAVAILABLE` says why, so selecting one fails
with that reason instead of an ImportError at import time.

Selection: `OpSelection` (in the engine config) names an implementation per op ("auto" = the
device's default, `DEVICE_DEFAULTS`); `resolve` turns it into `Ops`, once, when the model is built.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict

from train_engine_0_5b.errors import EngineError
from train_engine_0_5b.ops.adamw import foreach as adamw_foreach, reference as adamw_reference
from train_engine_0_5b.ops.attention import reference as attention_reference, sdpa as attention_sdpa
from train_engine_0_5b.ops.cross_entropy import reference as cross_entropy_reference
from train_engine_0_5b.ops.gemm import concat as gemm_concat, reference as gemm_reference
from train_engine_0_5b.ops.mlp import reference as mlp_reference
from train_engine_0_5b.ops.qkv_rope import reference as qkv_rope_reference
from train_engine_0_5b.ops.residual_scale import reference as residual_reference, weight as residual_weight
from train_engine_0_5b.ops.rmsnorm import reference as rmsnorm_reference
from train_engine_0_5b.ops.rope import reference as rope_reference
from train_engine_0_5b.ops.swiglu import reference as swiglu_reference

UNFUSED = "unfused"  # a fusion op's default: no fused op; the model calls its parts one by one (e.g. ops.mlp is None)
OPS: dict[str, dict[str, Callable | None]] = {
    "attention": {"reference": attention_reference.attention, "sdpa": attention_sdpa.attention},
    "gemm": {"reference": gemm_reference.gemm, "concat": gemm_concat.gemm},
    "rms_norm": {"reference": rmsnorm_reference.rms_norm},
    "add_rms_norm": {"reference": rmsnorm_reference.add_rms_norm},
    "rope": {"reference": rope_reference.rope},
    "qkv_rope": {UNFUSED: None, "reference": qkv_rope_reference.qkv_rope},
    "swiglu": {"reference": swiglu_reference.swiglu},
    "mlp": {UNFUSED: None, "reference": mlp_reference.mlp},
    "cross_entropy": {"reference": cross_entropy_reference.cross_entropy},
    "linear_cross_entropy": {UNFUSED: None, "reference": cross_entropy_reference.linear_cross_entropy},
    "residual_scale": {"reference": residual_reference.residual_scale, "weight": residual_weight.residual_scale},
    "adamw": {"reference": adamw_reference.adamw, "foreach": adamw_foreach.adamw},
}
FOLDER_OPS: dict[str, tuple[str, ...]] = {  # op folder -> the registry ops its modules define
    "attention": ("attention",), "gemm": ("gemm",), "rmsnorm": ("rms_norm", "add_rms_norm"), "rope": ("rope",),
    "qkv_rope": ("qkv_rope",),
    "swiglu": ("swiglu",), "mlp": ("mlp",), "cross_entropy": ("cross_entropy", "linear_cross_entropy"),
    "adamw": ("adamw",),
    "residual_scale": ("residual_scale",),
}
# ops/<folder>/<name>.py, registered as <name> when importable and its UNAVAILABLE_REASON is None
OPTIONAL_MODULES: tuple[str, ...] = ("triton_fused", "flash4", "quack_gated", "quack_dgated", "quack_triton")
UNAVAILABLE: dict[tuple[str, str], str] = {}  # (op, implementation) -> why it is not registered
GEMM_SITES: tuple[str, ...] = ("qkv", "attn_out", "fc1", "fc2", "output")
# what "auto" picks when no device default applies, else "reference"
FALLBACK: dict[str, str] = {"mlp": UNFUSED, "linear_cross_entropy": UNFUSED, "qkv_rope": UNFUSED}
MLP_PARTS: tuple[str, ...] = ("gemm.fc1", "swiglu", "gemm.fc2")  # what a fused mlp replaces
QKV_PARTS: tuple[str, ...] = ("gemm.qkv", "rope")  # what a fused qkv_rope replaces
OUTPUT_PARTS: tuple[str, ...] = ("gemm.output", "cross_entropy")  # what a fused linear_cross_entropy replaces
DEVICE_DEFAULTS: dict[str, dict[str, tuple[str, ...]]] = {  # "auto": the first registered; else FALLBACK's
    "cpu": {},
    # Triton AdamW: one launch, 4.5 ms vs foreach's 17 ms for the 0.43B-parameter step on an H100
    # (benchmarks/results/2026-11-23-h100-triton-kernels.json); foreach where triton is missing.
    # FA4 attention: 441 vs cuDNN SDPA's 376 TFLOP/s fwd+bwd; compiled step 45.7 % vs 43.4 % MFU
    # (benchmarks/results/2026-11-23-h100-attention.json); SDPA where FA4 cannot run (fp32, pre-Hopper).
    # quack_gated MLP (quack fc1 forward, Triton dSwiGLU): compiled step 149,269 vs 146,023 tokens/s unfused,
    # (benchmarks/results/engine-0.5b-quack-dswiglu-2026-11-23-h100/), gates M1-M3 pass (benchmarks/results/
    # gates/2026-11-23-h100-minicpm4-0.5b-bf16-quack/); unfused without quack.
    # Left at "reference" by measurement in the compiled, graphed step (benchmarks/results/engine-0.5b-graphfix-ab-
    # 2026-11-23-h100/): cross_entropy=triton_fused 147,371 vs 149,746 tokens/s and +4 GiB; gemm.qkv=concat 148,635
    # (Inductor's RoPE backward + concatenation kernel over its split views: 9 ms per step; qkv_rope replaces it).
    # residual_scale=weight (r on the out-projection weights: no multiply over (B, S, h) activations in the
    # backward): 150,026 / 151,279 vs 149,048 / 149,393 tokens/s, +0.23 GiB; gates M1-M3 bf16 pass
    # (benchmarks/results/engine-0.5b-residual-scale-2026-11-23-h100/, gates/2026-11-23-h100-minicpm4-0.5b-bf16-rsw/).
    # linear_cross_entropy=triton_fused (output GEMM + CE as one op, the logit gradient written over the logits in
    # the forward): 151,812 / 151,788 vs 150,248 / 150,533 tokens/s in one 32k-token chunk, then 8192-token
    # chunks as fast at 37.0 vs 40.4 GiB; alone 25.2 vs torch.compile's 26.8 ms fwd+bwd; gates M1-M3 bf16 pass
    # (benchmarks/results/engine-0.5b-linear-ce-2026-11-23-h100/, gates/2026-11-23-h100-minicpm4-0.5b-bf16-lce/);
    # unfused without triton.
    # qkv_rope=triton_fused (one GEMM on the concatenated q / k / v weights, one Triton pass each way writing
    # contiguous q / k / v and the packed gradient): 151,280 / 151,957 vs 149,117 / 149,542 tokens/s unfused,
    # interleaved; gates M1-M3 bf16 pass (benchmarks/results/engine-0.5b-qkv-rope-2026-11-24-h100/,
    # gates/2026-11-24-h100-minicpm4-0.5b-bf16-qkv-rope/); unfused without triton.
    # mlp=quack_dgated (dSwiGLU in quack's fc2 dgrad epilogue) and linear_cross_entropy=quack_triton (the logits GEMM
    # on quack), each with the SM90 config elected in ops/_quack.py: 156,051 / 157,124 / 156,151 vs 155,264 /
    # 154,446 / 153,212 tokens/s, 31.05 vs 37.05 GiB (postact no longer saved); kernel time per step 214.0 -> 209.2
    # ms; then the dx GEMM on quack and the logsumexp from the logits GEMM's epilogue (op 24.9 vs 26.2 ms); gates
    # M1-M3 bf16 pass (benchmarks/results/engine-0.5b-gemm-election-2026-11-24-h100/,
    # gates/2026-11-24-h100-minicpm4-0.5b-bf16-quack-lse/).
    "cuda": {"attention": ("flash4", "sdpa"), "adamw": ("triton_fused", "foreach"),
             "mlp": ("quack_dgated", "quack_gated", UNFUSED), "residual_scale": ("weight",),
             "linear_cross_entropy": ("quack_triton", "triton_fused", UNFUSED), "qkv_rope": ("triton_fused", UNFUSED)},
}
# implementation -> the compute dtypes it runs; "auto" skips it for others (an explicit choice then fails in it)
_HALF = (torch.bfloat16, torch.float16)
DTYPES: dict[str, tuple[torch.dtype, ...]] = {"flash4": _HALF, "quack_gated": _HALF, "quack_dgated": _HALF,
                                              "quack_triton": _HALF}


def _register_optional() -> None:
    for folder, ops in FOLDER_OPS.items():
        for name in OPTIONAL_MODULES:
            if importlib.util.find_spec(f"{__package__}.{folder}.{name}") is None:
                continue  # this folder has no such implementation
            try:
                module = importlib.import_module(f"{__package__}.{folder}.{name}")
            except ImportError as e:  # not written yet, or its toolchain (triton) is missing
                for op in ops:
                    UNAVAILABLE[(op, name)] = f"{type(e).__name__}: {e}"
                continue
            # a module may implement some of its folder's ops (cross_entropy/quack_triton: linear_cross_entropy)
            defined = [op for op in ops if callable(getattr(module, op, None))]
            if not defined:
                UNAVAILABLE[(ops[0], name)] = f"ops/{folder}/{name}.py defines none of {', '.join(ops)}"
            elif getattr(module, "HAS_TRITON", True) is False:  # importable, but its kernels cannot launch
                for op in defined:
                    UNAVAILABLE[(op, name)] = f"ops/{folder}/{name}.py: triton is not installed"
            elif getattr(module, "UNAVAILABLE_REASON", None):  # importable, but its toolchain is missing
                for op in defined:
                    UNAVAILABLE[(op, name)] = f"ops/{folder}/{name}.py: {module.UNAVAILABLE_REASON}"
            else:
                for op in defined:
                    OPS[op][name] = getattr(module, op)


_register_optional()


class GemmSites(BaseModel):
    """One implementation name per GEMM site."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    qkv: str = "auto"
    attn_out: str = "auto"
    fc1: str = "auto"
    fc2: str = "auto"
    output: str = "auto"


class OpSelection(BaseModel):
    """Which implementation runs each op: a name in OPS[op], or "auto" (the device's default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    attention: str = "auto"
    gemm: GemmSites = GemmSites()
    rms_norm: str = "auto"
    add_rms_norm: str = "auto"
    rope: str = "auto"
    qkv_rope: str = "auto"
    swiglu: str = "auto"
    mlp: str = "auto"
    cross_entropy: str = "auto"
    linear_cross_entropy: str = "auto"
    residual_scale: str = "auto"
    adamw: str = "auto"

    @classmethod
    def parse(cls, text: str) -> "OpSelection":
        """From `op=impl,...` (CLI form): `gemm=impl` sets every GEMM site, `gemm.qkv=impl` one site."""
        values: dict = {}
        gemm: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, impl = item.partition("=")
            if not sep or not impl:
                raise EngineError(f"--ops: {item!r} is not op=implementation")
            if key == "gemm":
                gemm |= dict.fromkeys(GEMM_SITES, impl)
            elif key.startswith("gemm."):
                gemm[key.removeprefix("gemm.")] = impl
            else:
                values[key] = impl
        try:
            return cls(**values, gemm=GemmSites(**gemm))
        except ValueError as e:
            raise EngineError(f"--ops: {e}") from None


@dataclass(frozen=True)
class Ops:
    """The resolved callables the model and optimizer call; `names` records the choice for logs."""

    attention: Callable
    gemm_qkv: Callable
    gemm_attn_out: Callable
    gemm_fc1: Callable
    gemm_fc2: Callable
    gemm_output: Callable
    rms_norm: Callable
    add_rms_norm: Callable
    rope: Callable
    qkv_rope: Callable | None  # None: "unfused"
    swiglu: Callable
    mlp: Callable | None  # None: "unfused"
    cross_entropy: Callable
    linear_cross_entropy: Callable | None  # None: "unfused"
    residual_scale: Callable | None  # None: "reference" (add_rms_norm applies r)
    adamw: Callable
    names: dict[str, str] = field(default_factory=dict)


def _pick(op: str, choice: str, device: str, label: str, dtype: torch.dtype | None) -> tuple[str, Callable | None]:
    if choice == "auto":
        preferred = DEVICE_DEFAULTS.get(device, {}).get(op, ())
        runs = lambda n: dtype is None or dtype in DTYPES.get(n, (dtype,))  # noqa: E731
        name = next((n for n in preferred if n in OPS[op] and runs(n)), FALLBACK.get(op, "reference"))
    else:
        name = choice
    if name in OPS[op]:
        return name, OPS[op][name]
    if (op, name) in UNAVAILABLE:
        raise EngineError(f"ops.{label}: implementation {name!r} is unavailable ({UNAVAILABLE[(op, name)]})")
    raise EngineError(f"ops.{label}: unknown implementation {name!r}; registered: {', '.join(sorted(OPS[op]))}")


def resolve(selection: OpSelection, device: str, dtype: torch.dtype | None = None) -> Ops:
    """The callables for `selection` on `device` ("cpu" or "cuda") computing in `dtype` (None: any);
    raises EngineError naming the op."""
    chosen: dict[str, Callable] = {}
    names: dict[str, str] = {}
    for op in ("attention", "rms_norm", "add_rms_norm", "rope", "qkv_rope", "swiglu", "mlp", "cross_entropy",
               "linear_cross_entropy", "residual_scale", "adamw"):
        names[op], chosen[op] = _pick(op, getattr(selection, op), device, op, dtype)
    for site in GEMM_SITES:
        names[f"gemm.{site}"], chosen[f"gemm_{site}"] = _pick("gemm", getattr(selection.gemm, site), device,
                                                              f"gemm.{site}", dtype)
    if chosen["mlp"] is not None:  # a fused mlp runs instead of these: the logs say so
        names.update(dict.fromkeys(MLP_PARTS, f"(in mlp={names['mlp']})"))
    if chosen["qkv_rope"] is not None:
        names.update(dict.fromkeys(QKV_PARTS, f"(in qkv_rope={names['qkv_rope']})"))
    if chosen["linear_cross_entropy"] is not None:
        names.update(dict.fromkeys(OUTPUT_PARTS, f"(in linear_cross_entropy={names['linear_cross_entropy']})"))
    return Ops(**chosen, names=names)
