"""Tolerance policies: when an engine's tensor counts as equal to the reference's.

Two figures per tensor, both recorded in every report:
- `rel`: ||a - b||_2 / ||b||_2 over the whole tensor (the norm-wise relative error);
- `max_rel`: max|a - b| / max|b| (the worst single element, relative to the reference's largest
  magnitude, so one bound works for logits ~1 and gradients ~1e-4 alike). `max_abs` = max|a - b|
  is recorded too.

Policies:
- `bitwise`: every element equal (values compared exactly after promotion to a common dtype; a NaN
  is never equal). For an engine that runs the reference's own kernels, and for the engine against
  itself (M6's resume check).
- `dtype`: for float32 / float64 the fixed per-dtype bounds below; for bfloat16 the comparative rule
  below. Either bound can be replaced (`rel=...,max=...` or GateOptions.rel_bound / max_bound): that
  makes the bounds fixed for any dtype (the part not given comes from `DTYPE_BOUNDS`).

Default bounds (`DTYPE_BOUNDS`) and why (numbers measured with tests/redteam/engines/base, a correct
engine whose kernels differ from the eager reference: SDPA attention, one fused QKV GEMM, F.rms_norm,
torch's AdamW arithmetic order, an RNG-drawn micro-batch accumulation order):
- float64: rel 1e-9, max_rel 1e-8. Reordered fp64 reductions differ by ~1e-15 per op; a few AdamW
  steps and the HF weight fold keep that far below 1e-12. A wrong constant anywhere is >1e-4.
- float32: rel 2e-5, max_rel 1e-4. Measured at the drawn tiny shapes (gates/case.py draw_shape: 3-4
  layers, seq 65-160, vocab 4096-4600, tied and untied heads, 2-3 micro batches, DP 2-4; CPU; seeds
  0-10, the base engine through M1-M4 and M6): logits max_rel 3.2e-7, loss 1.1e-7, gradients rel
  5.2e-7, final weights after 4 AdamW steps rel 3.7e-6 / max_rel 5.0e-5 (M4 vs the reference), one M3
  embedding element at max_rel 1.01e-4 within the AdamW step cap (below), DP=N vs DP=1 rel 7e-7 /
  max_rel 1.7e-5 (train_engine_0.5B; its CPU path equals the reference bitwise in M1-M3), the HF export
  against the reference's forward at the engine's own weights rel 1e-7 / max_rel 3e-7. Largest margin
  used: 0.19 of rel, 0.5 of max_rel. The red-team bugs sit at 1.9e-4 (RoPE theta 1e6 at seq 16; more at
  the drawn lengths), 2.6e-4 (weight decay skipped on one matrix for 4 steps) and above.
- bfloat16, fixed pair (used only when an override makes bf16 bounds fixed): rel 5e-2, max_rel 1e-1.
  bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3) and the residual stream is rounded
  to bf16 after every add, so two correct implementations random-walk apart by ~u per layer. Measured
  (CPU): full MiniCPM4-0.5B (24 layers, hidden 1024), seq 128: logits rel 2.0e-2, last hidden state
  1.9e-2 (max_rel 2.3e-2); the same depth at hidden 256: logits 6.5e-3, gradients 1.35e-2. On one
  H100 (seq 2048, benchmarks/results/gates/2026-11-23-h100-minicpm4-0.5b-bf16), both train_engine_0.5B
  and the base engine: logits 1.87e-2, worst gradient 3.4e-2, worst final weight after 4 steps
  max_rel 5.0e-2. A fixed pair must sit above the deepest, widest case, so it is blind at small
  ones: the red-team `residual_scale` bug (layer 1's branches scaled by 1/L, not 1/sqrt(L)) is rel
  1.0e-2 on a 3-4 layer tiny case in bf16, a fifth of 5e-2.

The comparative rule (the bfloat16 `dtype` policy). The gate also runs the reference in float32 on the
same case (its float32 twin: same weights, batches, schedule). Per tensor, with err = (rel, max_rel)
against the float32 reference: err(engine) <= K x err(bf16 reference) + floor, for rel and max_rel
alone; the report keeps both errors and the bounds (`Diff.ref_rel`, `ref_max_rel`, `bound_rel`,
`bound_max`). So the bound follows the depth, width, sequence and tensor at hand.
- K = RATIO_K = 2: a correct engine rounds at other places than the reference (fused kernels, other
  accumulation orders, bf16 outputs of fp32 kernels), about as often; rounding errors add in
  quadrature, so twice the reference's norm-wise error is room for about four times its rounding.
  Measured (CPU, bf16, drawn tiny shapes, 12 seeds, the base red-team engine, whose SDPA attention,
  fused QKV GEMM and F.rms_norm differ from the reference): engine / reference error ratio median 1.00,
  largest 1.10 over 78 forward tensors, 1.37 over 421 gradients (rel and max_rel alike). Structural
  bugs against the same bounds: `non_causal` 2.1-2.8x the rel bound at layer 0, `residual_scale`
  1.17-1.30x at layer 1 (seeds 1, 2, 7); RoPE theta 1e6 at seq < 160 stays inside bf16 noise (the
  fp32 gates catch it). Not yet measured on a GPU with kernels that differ more (FlashAttention, fused
  cross-entropy): the first bf16 GPU reports, which carry both errors per tensor, are that measurement.
- floor = the float32 bounds (2e-5 / 1e-4): a tensor the bf16 reference gets exactly (lrs, from the
  schedule in fp64) or nearly is held to what fp32 arithmetic allows, never to zero.
- scalars: one scalar's error is one random draw, and the ratio of two such draws is Cauchy-like (a
  correct engine would exceed 2x about 30 % of the time). So a lone scalar (a loss) takes the larger of
  its reference error and u, and the steps of a series (losses, grad norms) share the series' largest
  reference error, at least u; a series the reference gets exactly (lrs) keeps only the floor.
  Measured (CPU tiny bf16): loss errors 7e-7 to 6e-5, far below 2u = 7.8e-3; one step's engine error
  was 16x the reference's at that step (1.5e-5 vs 8.9e-7).
- weights after AdamW steps: see below (step cap COMPARATIVE_STEP_SHARE, ADAMW_FLIPS).
Overrides (`rel=X,max=Y`, GateOptions.rel_bound / max_bound) replace the rule by fixed bounds.

The float64-twin rule (grad norms, float32 `dtype` policy). A grad norm is one reduction over every
gradient element, and how a stack orders it moves the result far more than the gradients differ. The
reference takes each gradient's fp32 norm (torch.linalg.vector_norm), then the norm of those; on a CPU that
lands below the exact norm of the same gradients by 0.9-5.3e-5 on tiny cases (seeds 0-7 and the red-team
seed; their vocab x hidden embeddings hold ~3e5 elements) and 6.5-7.0e-5 on the reduced 8B preset
(minicpm4-8b-reduced, 1M-element embedding and lm_head), while the gradients themselves agree with an
engine's to ~5e-7. An engine that reduces as torch does rounds the same way and sits within the fixed 2e-5;
one that reduces otherwise does not, though it is as right or righter (train_engine_8b at TP=2 sums two
half-size norms: 1.4-3.0e-5 off the exact norm, 2.4-4.1e-5 off the reference's). So under the default
float32 policy the reference's steps answer carries `grad_norms_exact` (gates/probe.py): the norm of its own
fp32 gradients with every square summed in float64 (gates/stacks/torch_ref/optim.py exact_norm), its float64
twin; and per step
  err(engine grad_norms[t] vs grad_norms_exact[t]) <= K x s + rel bound (2e-5),
  s = max over the steps of |grad_norms[t] - grad_norms_exact[t]| / grad_norms_exact[t],
the comparative rule with the fp32 reference in the bf16 one's place and float64 in float32's (K = RATIO_K,
a floor of the fixed fp32 bounds, one scale shared by the steps as under `scalars` above). Where the engine
is measured against itself (M4's DP=N vs DP=1) the target is its other run's norm and the reference's s
still sets the bound. Each such Diff records s (`ref_rel`), the bound (`bound_rel`) and, in its note, the
target and how the bound was made. It admits a norm that rounds like the reference's (error s), more exactly
(~0) or the other way (up to 2s). Measured bounds: 3.8e-5-1.3e-4 on tiny cases, 1.50-1.60e-4 on the reduced
8B at TP=2 (M3, M4, M7 on the seed of tests/gates/test_tp_gates.py), where the engine used at most 0.19 of it.
It still rejects a norm off by a constant (x1.001: rel 9.8e-4 against a bound of 8.1e-5 on tiny seed 0, 9.7e-4
against 1.55e-4 on the reduced 8B at TP=2), a TP shard's squares left out of the sum (0.26-0.35 vs 1.6e-4), a
wrong DP loss average (red-team dp_mean_of_means: 3.1e-3 vs 3.8e-5) or a wrong step before (gate_detect's 2x
lr: 1.4e-2 vs 5.9e-5 at step 1); tests/gates/test_grad_norm_twin.py. Bitwise policies, overrides (fixed
bounds for everything), fp64 cases (the reference's norm is already fp64), bf16 (the comparative rule, whose
fp32 twin's norm error is ~1e-2 of bf16's least scale u) and a reference without the twin (the megatron
stack; the report's artifacts say so) keep the usual bounds.

Weights after AdamW steps (M3, M4): `max_rel` alone is not a fixed property of a correct engine there.
AdamW divides each element's update by that element's own gradient scale, so an element whose gradient
nearly cancels turns a rounding difference into up to a full step, and the worst element over a tensor
is heavy-tailed across seeds (fp32 tiny, engine ops that sum in another order: max_rel 1.5e-4 once in
150 seeds of the engine's own probe test, 1.9e-4 once in CI; the base red-team engine's M3: worst 6.0e-5
over 91 seeds). So those tensors also pass the max criterion when `max_abs` <= ADAMW_STEP_SHARE x the
summed LRs (`adamw_step_cap`): one element off by less than a quarter of what AdamW could move it, with
the norm-wise `rel` bound still held. The note says when the cap was used. Broad optimizer bugs stay far
out on `rel` (weight decay skipped on one matrix: rel 2.6e-4 vs 2e-5); a gross single-element bug (a
missed or doubled update) is a step or more.
In bf16 (comparative rule) gradient noise of ~1 % reverses the sign-like first Adam steps of every
element whose gradient is that small, so a handful of elements per tensor end up to whole steps apart,
and how many is a small count (Poisson): a 2048-element v_proj had one such element more in the engine
than in the reference (rel 1.8e-4 vs 7.4e-5, max_abs 1.12e-4 = 0.43 x the summed LRs; 1 of 553 values
over 12 seeds). So there the step cap is COMPARATIVE_STEP_SHARE = 1.0 x the summed LRs, and the rel
bound also admits ADAMW_FLIPS = 4 elements off by the cap (`flip_allowance`); on those 12 seeds a share
>= 0.5 and >= 1 element suffice, so 1.0 and 4 leave 2x and 4x. Bugs that touch every element stay far
above (master weights kept in bf16: at |w| ~ 2e-2 the bf16 spacing is 1.2e-4, so updates of lr 1e-4 round
to 0 or a whole spacing, an error of the order of the update, lr / |w| ~ 5e-3 per step, on every element).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from gates.probe import REFERENCE_EXACT_NORMS

DTYPE_BOUNDS: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-8),
    "float32": (2e-5, 1e-4),
    "bfloat16": (5e-2, 1e-1),  # fixed pair, used only when a `rel=` / `max=` override makes bf16 bounds fixed
}
POLICY_NAMES = ("dtype", "bitwise")
RATIO_K = 2.0  # comparative rule: engine's error vs the fp32 reference <= K x the bf16 reference's (see above)
COMPARATIVE_DTYPES = ("bfloat16",)  # dtypes whose `dtype` policy is the comparative rule
TWIN_DTYPES = ("float32",)  # dtypes whose `dtype` policy holds grad norms to the float64-twin rule (see above)
EXACT_TWINS = {"grad_norms": REFERENCE_EXACT_NORMS}  # series -> the reference's float64 twin of it (see above)
BF16_UNIT = 2.0**-8  # bf16 unit roundoff: least error scale of a scalar the bf16 reference rounds (see above)
ADAMW_STEP_SHARE = 0.25  # of the summed LRs: how far one weight element may differ after AdamW steps (see above)
COMPARATIVE_STEP_SHARE = 1.0  # the same, comparative rule: bf16 noise can reverse whole Adam steps (see above)
ADAMW_FLIPS = 4  # comparative rule, weights after AdamW: elements off by the step cap, on top of K x (see above)
_CHUNK = 1 << 24  # elements per chunk when reducing big tensors (0.5B logits are ~1.5e8 elements)


class Policy(BaseModel):
    """A resolved tolerance policy: bitwise, fixed bounds (`rel` / `max_rel`), or the comparative rule
    (`ratio` = K, with the additive floors `floor_rel` / `floor_max`)."""

    model_config = ConfigDict(frozen=True)
    name: Literal["dtype", "bitwise"]
    dtype: str
    rel: float | None = Field(None, ge=0)
    max_rel: float | None = Field(None, ge=0)
    ratio: float | None = Field(None, gt=0, description="K of the comparative rule; None: fixed bounds")
    floor_rel: float = Field(0.0, ge=0)
    floor_max: float = Field(0.0, ge=0)
    scalar_scale: float = Field(0.0, ge=0, description="least error scale of a rounded scalar (comparative rule)")
    step_share: float = Field(ADAMW_STEP_SHARE, gt=0, description="AdamW step cap, as a share of the summed LRs")
    twin_ratio: float | None = Field(None, gt=0, description="K of the float64-twin rule for grad norms; None: "
                                     "the policy's bounds for them too")

    @property
    def bitwise(self) -> bool:
        return self.name == "bitwise"

    @property
    def comparative(self) -> bool:
        """True when bounds come from the reference's own error against its float32 twin."""
        return self.ratio is not None and not self.bitwise

    def describe(self) -> str:
        if self.bitwise:
            return "bitwise (every element equal)"
        if self.comparative:
            return (f"{self.dtype} comparative bounds: error vs the float32 reference <= {self.ratio:g} x the "
                    f"{self.dtype} reference's (+ rel {self.floor_rel:g}, max_rel {self.floor_max:g})")
        text = f"{self.dtype} bounds: rel <= {self.rel:g}, max_rel <= {self.max_rel:g}"
        if self.twin_rule:
            text += (f"; grad norms: error vs the reference's float64-accumulated norm <= {self.twin_ratio:g} x its "
                     f"own float32 norm's + {self.rel:g}")
        return text

    @property
    def twin_rule(self) -> bool:
        """True when grad norms follow the float64-twin rule (see above)."""
        return self.twin_ratio is not None and not self.bitwise and not self.comparative


def resolve_policy(spec: str, dtype: str, rel: float | None = None, max_rel: float | None = None) -> Policy:
    """`spec` is `bitwise`, `dtype`, or `rel=X,max=Y` (either part optional, the rest from the dtype)."""
    spec = spec.strip()
    if spec == "bitwise":
        return Policy(name="bitwise", dtype=dtype)
    if dtype not in DTYPE_BOUNDS:
        raise ValueError(f"no default bounds for dtype {dtype!r}; one of {', '.join(DTYPE_BOUNDS)}")
    d_rel, d_max = DTYPE_BOUNDS[dtype]
    given = {}
    if spec != "dtype":
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, _, value = part.partition("=")
            if key not in ("rel", "max") or not value:
                raise ValueError(f"bad policy {spec!r}: expected `bitwise`, `dtype` or `rel=X,max=Y`")
            given[key] = float(value)
    given |= {k: v for k, v in (("rel", rel), ("max", max_rel)) if v is not None}
    if dtype in COMPARATIVE_DTYPES and not given:
        f_rel, f_max = DTYPE_BOUNDS["float32"]
        return Policy(name="dtype", dtype=dtype, ratio=RATIO_K, floor_rel=f_rel, floor_max=f_max,
                      scalar_scale=BF16_UNIT, step_share=COMPARATIVE_STEP_SHARE)
    twin = RATIO_K if dtype in TWIN_DTYPES and not given else None
    return Policy(name="dtype", dtype=dtype, rel=given.get("rel", d_rel), max_rel=given.get("max", d_max), twin_ratio=twin)


class Diff(BaseModel):
    """One tensor compared: both error figures, the bounds it was held to, and the verdict. Under the
    comparative rule the figures are the engine's error against the float32 reference and `ref_rel` /
    `ref_max_rel` the bf16 reference's own."""

    name: str
    shape: list[int]
    rel: float
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""
    ref_rel: float | None = None
    ref_max_rel: float | None = None
    bound_rel: float | None = None
    bound_max: float | None = None

    def figures(self) -> str:
        text = f"rel {self.rel:.3e}, max_abs {self.max_abs:.3e} (max_rel {self.max_rel:.3e})"
        if self.ref_rel is not None:
            text += f"; reference rel {self.ref_rel:.3e}, max_rel {self.ref_max_rel:.3e}"
        return text


class Errors(BaseModel):
    """The error figures of one tensor against another."""

    rel: float
    max_abs: float
    max_rel: float
    equal: bool

    @property
    def nan(self) -> bool:
        return self.rel != self.rel or self.max_abs != self.max_abs


def _stats(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, float, bool]:
    """(||a-b||^2, ||b||^2, max|a-b|, max|b|, bit-equal), chunked in float64."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    sq_d = sq_b = max_d = max_b = 0.0
    equal = True
    for i in range(0, max(1, fa.numel()), _CHUNK):
        ca, cb = fa[i : i + _CHUNK].double(), fb[i : i + _CHUNK].double()
        if ca.numel() == 0:
            break
        d = ca - cb
        sq_d += float(d.square().sum())
        sq_b += float(cb.square().sum())
        max_d = max(max_d, float(d.abs().max()))
        max_b = max(max_b, float(cb.abs().max()))
        equal = equal and bool(torch.equal(ca, cb))
    return sq_d, sq_b, max_d, max_b, equal


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def errors(a: torch.Tensor, b: torch.Tensor) -> Errors:
    """`a`'s error figures against `b` (same shapes)."""
    sq_d, sq_b, max_d, max_b, equal = _stats(a, b)
    return Errors(rel=_ratio(sq_d**0.5, sq_b**0.5), max_abs=max_d, max_rel=_ratio(max_d, max_b), equal=equal)


def adamw_step_cap(lrs: torch.Tensor, policy: Policy | None = None) -> float:
    """The largest single-element difference allowed in a weight after AdamW steps at these LRs (see above)."""
    share = policy.step_share if policy is not None else ADAMW_STEP_SHARE
    return share * float(lrs.double().abs().sum())


def _mismatch(name: str, a: torch.Tensor, b: torch.Tensor) -> Diff | None:
    """A failing Diff when the shapes differ, else None."""
    if tuple(a.shape) == tuple(b.shape):
        return None
    return Diff(name=name, shape=list(b.shape), rel=float("inf"), max_abs=float("inf"), max_rel=float("inf"),
                ok=False, note=f"shape {list(a.shape)} != reference {list(b.shape)}")


def _nan_diff(name: str, shape: list[int]) -> Diff:
    nan = float("nan")
    return Diff(name=name, shape=shape, rel=nan, max_abs=nan, max_rel=nan, ok=False, note="NaN")


def compare(name: str, a: torch.Tensor, b: torch.Tensor, policy: Policy, step_cap: float | None = None) -> Diff:
    """Engine tensor `a` against reference tensor `b` under a bitwise or fixed-bound policy. `step_cap`
    (weights after AdamW steps, non-bitwise policies only): `max_abs` within it satisfies the max criterion
    too (see above). The comparative rule needs the float32 reference: `compare_scaled`."""
    if policy.comparative:
        raise ValueError(f"{policy.describe()} needs the float32 reference's answer: use compare_scaled "
                         "(gates.context.GateRun.compare_names does)")
    bad = _mismatch(name, a, b)
    if bad is not None:
        return bad
    e = errors(a, b)
    if e.nan:
        return _nan_diff(name, list(b.shape))
    if policy.bitwise:
        return Diff(name=name, shape=list(b.shape), rel=e.rel, max_abs=e.max_abs, max_rel=e.max_rel, ok=e.equal,
                    note="" if e.equal else "not bit-identical")
    ok, note = _bounds(e, policy.rel, policy.max_rel, step_cap)
    return Diff(name=name, shape=list(b.shape), rel=e.rel, max_abs=e.max_abs, max_rel=e.max_rel, ok=ok, note=note,
                bound_rel=policy.rel, bound_max=policy.max_rel)


def _bounds(e: Errors, bound_rel: float, bound_max: float, step_cap: float | None) -> tuple[bool, str]:
    """(ok, note) against explicit bounds; the note names every bound exceeded, and the step cap when it
    is what kept an element within bounds."""
    parts = []
    if e.rel > bound_rel:
        parts.append(f"rel {e.rel:.3e} > {bound_rel:.3g}")
    max_ok = e.max_rel <= bound_max
    if not max_ok:
        over = f"max_rel {e.max_rel:.3e} > {bound_max:.3g}"
        if step_cap is not None:
            max_ok = e.max_abs <= step_cap
            over += f" {'but' if max_ok else 'and'} max_abs {e.max_abs:.3e} {'<=' if max_ok else '>'} AdamW step cap {step_cap:.3e}"
        parts.append(over)
    return e.rel <= bound_rel and max_ok, "; ".join(parts)


def compare_series(name: str, a: torch.Tensor, b: torch.Tensor, policy: Policy) -> list[Diff]:
    """Per-step scalars (losses, grad norms, lrs): one Diff per step, named `name[t]`."""
    if a.shape != b.shape:
        return [compare(name, a, b, policy)]
    return [compare(f"{name}[{t}]", a[t], b[t], policy) for t in range(b.shape[0])]


# ----- the comparative rule (bf16) -------------------------------------------------------------------
class Scale(BaseModel):
    """The low-precision reference's own error figures against its float32 twin: what sets the bounds."""

    rel: float
    max_rel: float


def reference_scale(ref: torch.Tensor, exact: torch.Tensor) -> Scale:
    """The bf16 reference's error against the float32 reference (NaN / shape mismatch: a gate error)."""
    if tuple(ref.shape) != tuple(exact.shape):
        raise ValueError(f"reference shape {list(ref.shape)} != its float32 twin's {list(exact.shape)}")
    e = errors(ref, exact)
    if e.nan:
        raise ValueError("the reference's output or its float32 twin's is NaN")
    return Scale(rel=e.rel, max_rel=e.max_rel)


def series_scale(ref: torch.Tensor, exact: torch.Tensor, policy: Policy) -> Scale:
    """One scale for every step of a per-step series: a single scalar's error is one random draw that can
    land near zero, so steps share the series' largest, and a series the reference rounds at all gets at
    least `policy.scalar_scale` (see above). A series the reference gets exactly (lrs) keeps scale 0."""
    worst = max((reference_scale(ref[t], exact[t]).rel for t in range(exact.shape[0])), default=0.0)
    s = max(worst, policy.scalar_scale) if worst > 0 else 0.0
    return Scale(rel=s, max_rel=s)


def scalar_scale(s: Scale, numel: int, policy: Policy) -> Scale:
    """A lone scalar (a loss) the reference rounds gets at least `policy.scalar_scale` (see above)."""
    if numel != 1 or s.rel == 0:
        return s
    v = max(s.rel, policy.scalar_scale)
    return Scale(rel=v, max_rel=v)


def flip_allowance(target: torch.Tensor, step_cap: float) -> float:
    """The norm-wise share of ADAMW_FLIPS elements each off by `step_cap` (comparative rule, see above)."""
    return _ratio(ADAMW_FLIPS**0.5 * step_cap, float(target.double().norm()))


def compare_scaled(name: str, a: torch.Tensor, target: torch.Tensor, scale: Scale, policy: Policy,
                   step_cap: float | None = None) -> Diff:
    """The comparative rule: `a`'s error against `target` (the float32 reference, or another run of the
    engine) <= K x `scale` + the floor, for rel and max_rel alike; `step_cap` as in `compare`."""
    bad = _mismatch(name, a, target)
    if bad is not None:
        return bad
    e = errors(a, target)
    if e.nan:
        return _nan_diff(name, list(target.shape))
    k = policy.ratio
    b_rel, b_max = k * scale.rel + policy.floor_rel, k * scale.max_rel + policy.floor_max
    if step_cap is not None:
        b_rel += flip_allowance(target, step_cap)
    ok, note = _bounds(e, b_rel, b_max, step_cap)
    if note:
        note += f" (bounds: {k:g} x the reference's rel {scale.rel:.3e} / max_rel {scale.max_rel:.3e} + floor)"
    return Diff(name=name, shape=list(target.shape), rel=e.rel, max_abs=e.max_abs, max_rel=e.max_rel, ok=ok,
                note=note, ref_rel=scale.rel, ref_max_rel=scale.max_rel, bound_rel=b_rel, bound_max=b_max)


# ----- the float64-twin rule (float32 grad norms) ------------------------------------------------------
def twin_scale(ref: torch.Tensor, exact: torch.Tensor) -> Scale:
    """The reference's own float32 series against its float64 twin: the largest step's relative error, shared
    by every step (see above). NaN / shape mismatch: a gate error."""
    if tuple(ref.shape) != tuple(exact.shape) or ref.ndim != 1:
        raise ValueError(f"reference series shape {list(ref.shape)} != its float64 twin's {list(exact.shape)}")
    r, x = ref.double(), exact.double()
    if not bool(torch.isfinite(r).all() and torch.isfinite(x).all()):
        raise ValueError("the reference's series or its float64 twin is not finite")
    s = max((_ratio(abs(float(r[t] - x[t])), abs(float(x[t]))) for t in range(x.shape[0])), default=0.0)
    return Scale(rel=s, max_rel=s)


def compare_twin_series(name: str, a: torch.Tensor, target: torch.Tensor, scale: Scale, policy: Policy,
                        against: str) -> list[Diff]:
    """The float64-twin rule: per step, `a`'s error against `target` (the reference's float64 twin, or another
    run of the engine: `against` names it in each note) <= K x `scale` (`twin_scale`) + the policy's bounds.
    One Diff per step, named `name[t]`, each recording the scale and the bound."""
    rule = policy.model_copy(update={"ratio": policy.twin_ratio, "floor_rel": policy.rel, "floor_max": policy.max_rel})
    if a.shape != target.shape:
        return [compare_scaled(name, a, target, scale, rule)]
    diffs = []
    for t in range(target.shape[0]):
        d = compare_scaled(f"{name}[{t}]", a[t], target[t], scale, rule)
        how = (f"vs {against}; bound rel {d.bound_rel:.3e} = {rule.ratio:g} x the reference's own float32 norm error "
               f"{scale.rel:.3e} (vs its float64 twin) + {rule.floor_rel:g}")
        d.note = f"{d.note.split(' (bounds:')[0]}; {how}" if d.note else how
        diffs.append(d)
    return diffs
