"""The op table: every op, its implementations, what `auto` picks per device, and each implementation's
tunable space. Selection (registry.py), the op table of `bench` (op_table.py), the op tests'
parametrization and the per-op harness of the gates all derive from `TABLE`.

Adding an op version: its module `ops/<folder>/<impl>.py` (defining a function named after the op), its test
`tests/ops/test_<folder>_<impl>.py`, and one `Impl` row here.

Ops and their signatures (every implementation of an op has its reference's, see each reference.py):
    attention(q, k, v) -> o                          causal GQA; q (B,S,n,d), k/v (B,S,g,d), o (B,S,n,d)
    gemm(x, weights) -> tuple of outputs             one per weight; per site: qkv, attn_out, fc1, fc2, output
    rms_norm(x, weight, eps) -> y
    add_rms_norm(x, y, weight, eps, residual_scale) -> (rms_norm(h), h),  h = x + y * residual_scale
    rope(q, k, cos, sin) -> (q, k)                   rotate-half, tables (S, d)
    qkv_rope(x, (wq, wk, wv), cos, sin) -> (q, k, v) the qkv GEMM and rope as one op ("unfused": the model calls both)
    swiglu(gate, up) -> silu(gate) * up
    mlp(x, gate_w, up_w, down_w) -> y                fc1 / swiglu / fc2 as one op ("unfused": the three ops)
    cross_entropy(logits, labels) -> sum of token CE over labels != -100 (>= float32)
    linear_cross_entropy(x, weight, labels)          the output GEMM and the loss as one op, never holding the logits
    residual_scale(w, r) -> w * r                    "reference" = None: add_rms_norm applies r; "weight": r on the
                                                     o_proj / down_proj weights (add_rms_norm then gets r = 1)
    adamw(params, grads, exp_avgs, exp_avg_sqs, *, step, lr, beta1, beta2, eps, weight_decays) -> None (in place)
Measurements behind the device defaults: benchmarks/results (its index), never here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from ..core.errors import EngineError


@dataclass(frozen=True)
class Param:
    """One tunable: its default (what runs without an election) and the values a search may try."""

    default: Any
    domain: tuple
    why: str = ""

    def __post_init__(self) -> None:
        if not self.allows(self.default):
            raise ValueError(f"default {self.default!r} is not in the domain {self.domain!r}")

    def allows(self, value: Any) -> bool:
        return any(same(value, d) for d in self.domain)


def normalize(value: Any) -> Any:
    """JSON has no tuples: a list value (a GEMM tile config) compares as a tuple."""
    return tuple(normalize(v) for v in value) if isinstance(value, list) else value


def same(a: Any, b: Any) -> bool:
    """Equal, and a bool only equals a bool (True is not 1)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


UNFUSED = "unfused"  # a fusion op's default: no op of its own, the model calls its parts one by one
HALF = ("bfloat16", "float16")


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: `module` under ops/ (None: UNFUSED), optional ones registered only when
    they import and their toolchain is present; `dtypes`: the compute dtypes `auto` may pick it for."""

    name: str
    module: str | None
    optional: bool = False
    dtypes: tuple[str, ...] | None = None
    space: dict[str, Param] = field(default_factory=dict)
    supports: Callable[[Any], str | None] | None = None  # cases.Dims -> why it cannot run them (None: it can)


@dataclass(frozen=True)
class OpSpec:
    """An op: its implementations, `auto`'s preference per device (first registered that runs the dtype wins,
    else `fallback`), GEMM-like `sites` selected one by one, and the ops a fused version replaces."""

    name: str
    impls: tuple[Impl, ...]
    defaults: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fallback: str = "reference"
    sites: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()

    def impl(self, name: str) -> Impl:
        for i in self.impls:
            if i.name == name:
                return i
        raise EngineError(f"ops.{self.name}: unknown implementation {name!r}; declared: "
                          f"{', '.join(i.name for i in self.impls)}")

    @property
    def labels(self) -> tuple[str, ...]:
        """The selection labels: the op, or one per site (gemm.qkv, ...)."""
        return tuple(f"{self.name}.{s}" for s in self.sites) or (self.name,)


_WARPS = (1, 2, 4, 8, 16)
_BY_SHAPE = "None: chosen from the row width, as before any election"
# quack SM90 GEMM tile configs: (tile_m, tile_n, pingpong, cluster_m, cluster_n)
_TILES = ((128, 128, True, 1, 2), (128, 128, True, 2, 1), (128, 160, True, 2, 1), (128, 192, True, 2, 1),
          (128, 256, False, 1, 2), (128, 256, True, 1, 2))
_LSE_TILES = tuple(t for t in _TILES if t[1] <= 208)  # quack's GEMM + log-sum-exp epilogue takes tile N <= 208
_ROW_NORM = {"num_warps": Param(None, (None, *_WARPS), _BY_SHAPE)}


def _fa4_shapes(d: Any) -> str | None:
    """FA4 on SM90 runs head dims that are multiples of 8, from 8 to 256."""
    ok = d.head_dim % 8 == 0 and 8 <= d.head_dim <= 256
    return None if ok else f"FA4 needs a head dim that is a multiple of 8 in 8..256, not {d.head_dim}"


def quack_widths(hidden: int, vocab: int) -> str | None:
    """What quack's GEMMs need and these widths lack (their row strides must be 16 bytes: multiples of 8 in bf16),
    or None; read by the table below and by the op itself."""
    ok = hidden % 8 == 0 and vocab % 8 == 0
    return None if ok else f"hidden size and vocabulary multiples of 8, not {hidden} and {vocab}"


def _quack_ce_shapes(d: Any) -> str | None:
    why = quack_widths(d.hidden, d.vocab)
    return None if why is None else f"quack's GEMMs need {why}"


_ROPE = {"num_warps": Param(None, (None, 1, 2, 4, 8), _BY_SHAPE)}

TABLE: tuple[OpSpec, ...] = (
    OpSpec("attention", (
        Impl("reference", "attention.reference"),
        Impl("sdpa", "attention.sdpa"),
        Impl("flash4", "attention.flash4", optional=True, dtypes=HALF, space={
            "fwd_tile_mn": Param(None, (None, (128, 128), (192, 128)), "None: FA4's own pick"),
            "fwd_intra_wg_overlap": Param(None, (None, False), "None: FA4's own pick"),
            "fwd_pack_gqa": Param(None, (None, False), "None: FA4's own pick")}, supports=_fa4_shapes),
    ), defaults={"cuda": ("flash4", "sdpa")}),
    OpSpec("gemm", (Impl("reference", "gemm.reference"), Impl("concat", "gemm.concat")),
           sites=("qkv", "attn_out", "fc1", "fc2", "output")),
    OpSpec("rms_norm", (Impl("reference", "rmsnorm.reference"),
                        Impl("triton_fused", "rmsnorm.triton_fused", optional=True, space=_ROW_NORM))),
    OpSpec("add_rms_norm", (Impl("reference", "rmsnorm.reference"),
                            Impl("triton_fused", "rmsnorm.triton_fused", optional=True, space=_ROW_NORM))),
    OpSpec("rope", (Impl("reference", "rope.reference"),
                    Impl("triton_fused", "rope.triton_fused", optional=True, space=_ROPE))),
    OpSpec("qkv_rope", (
        Impl(UNFUSED, None), Impl("reference", "qkv_rope.reference"),
        Impl("triton_fused", "qkv_rope.triton_fused", optional=True, space=_ROPE),
    ), defaults={"cuda": ("triton_fused", UNFUSED)}, fallback=UNFUSED, replaces=("gemm.qkv", "rope")),
    OpSpec("swiglu", (Impl("reference", "swiglu.reference"), Impl(
        "triton_fused", "swiglu.triton_fused", optional=True, space={
            "block": Param(1024, (256, 512, 1024, 2048, 4096), "columns per program"),
            "num_warps": Param(4, (1, 2, 4, 8))}))),
    OpSpec("mlp", (
        Impl(UNFUSED, None), Impl("reference", "mlp.reference"),
        Impl("quack_gated", "mlp.quack_gated", optional=True, dtypes=HALF, space={
            "dswiglu_block": Param(1024, (256, 512, 1024, 2048, 4096)), "dswiglu_num_warps": Param(4, (2, 4, 8))}),
        Impl("quack_dgated", "mlp.quack_dgated", optional=True, dtypes=HALF, space={
            "fc2_dgrad_tile": Param((128, 128, True, 1, 2), _TILES, "quack's fc2 dgrad + dSwiGLU on SM90")}),
    ), defaults={"cuda": ("quack_dgated", "quack_gated", UNFUSED)}, fallback=UNFUSED,
        replaces=("gemm.fc1", "swiglu", "gemm.fc2")),
    OpSpec("cross_entropy", (Impl("reference", "cross_entropy.reference"), Impl(
        "triton_fused", "cross_entropy.triton_fused", optional=True, space={
            "block_v": Param(None, (None, 1024, 2048, 4096, 8192, 16384), _BY_SHAPE),
            "num_warps": Param(None, (None, 4, 8, 16), _BY_SHAPE)}))),
    OpSpec("linear_cross_entropy", (
        Impl(UNFUSED, None), Impl("reference", "cross_entropy.reference"),
        Impl("triton_fused", "cross_entropy.triton_fused", optional=True, space={
            "programs_per_sm": Param(2, (0, 0.25, 0.5, 1, 2, 4), "0: one program per row"),
            "block_v": Param(16384, (4096, 8192, 16384, 32768)), "num_warps": Param(16, (4, 8, 16, 32)),
            "l2_hint": Param(True, (True, False), "eviction hints so the second read of a row hits L2")}),
        Impl("quack_triton", "cross_entropy.quack_triton", optional=True, dtypes=HALF, space={
            "grad_block_v": Param(4096, (1024, 2048, 4096, 8192)), "grad_num_warps": Param(8, (2, 4, 8)),
            "grad_split": Param(True, (True, False), "a program per block of a row, not per row"),
            "lse_epilogue": Param(True, (True, False), "each row's logsumexp from the logits GEMM's epilogue (one "
                                  "read of the logits; renormalized to the rounded logits by the row sums the "
                                  "gradient pass takes)"),
            "logits_tile": Param((128, 160, True, 2, 1), _LSE_TILES),
            "dgrad_tile": Param((128, 256, False, 1, 2), _TILES)}, supports=_quack_ce_shapes),
    ), defaults={"cuda": ("quack_triton", "triton_fused", UNFUSED)}, fallback=UNFUSED,
        replaces=("gemm.output", "cross_entropy")),
    OpSpec("residual_scale", (Impl("reference", "residual_scale.reference"), Impl("weight", "residual_scale.weight")),
           defaults={"cuda": ("weight",)}),
    OpSpec("adamw", (
        Impl("reference", "adamw.reference"), Impl("foreach", "adamw.foreach"),
        Impl("triton_fused", "adamw.triton_fused", optional=True, space={
            "block": Param(1024, (256, 512, 1024, 2048), "elements per loop step; divides the 16384-element work item"),
            "num_warps": Param(4, (2, 4, 8))}),
    ), defaults={"cuda": ("triton_fused", "foreach")}),
)
SPECS: dict[str, OpSpec] = {s.name: s for s in TABLE}


def spec(op: str) -> OpSpec:
    if op not in SPECS:
        raise EngineError(f"unknown op {op!r}; the ops: {', '.join(SPECS)}")
    return SPECS[op]


def param(op: str, impl: str, name: str) -> Param:
    space = spec(op).impl(impl).space
    if name not in space:
        raise EngineError(f"ops.{op}={impl}: unknown parameter {name!r}; declared: {', '.join(space) or 'none'}")
    return space[name]


def check_values(op: str, impl: str, values: dict) -> dict:
    """`values` normalized (lists -> tuples); an unknown op, implementation or parameter, or a value outside
    the declared domain, is an EngineError naming it."""
    spec(op).impl(impl)
    out = {}
    for name, raw in values.items():
        p, v = param(op, impl, name), normalize(raw)
        if not p.allows(v):
            raise EngineError(f"ops.{op}={impl}: {name}={raw!r} is outside the declared domain {list(p.domain)}")
        out[name] = v
    return out


def check_tuned(ops: dict[str, dict[str, dict]]) -> dict[tuple[str, str], dict]:
    """Every (op, implementation) of a tuned entry's `ops`, validated."""
    return {(op, impl): check_values(op, impl, values) for op, impls in ops.items() for impl, values in impls.items()}


def contract(op: str) -> str:
    """The op's lines of this module's signature list."""
    lines = (__doc__ or "").splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"    {op}("):
            more = itertools.takewhile(lambda x: x.startswith("      "), lines[i + 1:])
            return "\n".join(x.strip() for x in [line, *more])
    return ""


def describe() -> dict:
    """The table as JSON (for the gates' per-op harness and the tune backend, which never import it)."""
    return {s.name: {"contract": contract(s.name), "sites": list(s.sites), "replaces": list(s.replaces),
                     "fallback": s.fallback,
                     "defaults": {d: list(v) for d, v in s.defaults.items()},
                     "impls": {i.name: {"module": i.module, "optional": i.optional, "dtypes": i.dtypes,
                                        "space": {n: {"default": p.default, "domain": list(p.domain), "why": p.why}
                                                  for n, p in i.space.items()}} for i in s.impls}}
            for s in TABLE}
