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
- `dtype`: the per-dtype bounds below, from the case's compute dtype; either bound can be replaced
  (`rel=...,max=...` or GateOptions.rel_bound / max_bound).

Default bounds (`DTYPE_BOUNDS`) and why (numbers measured with tests/redteam/engines/base, a correct
engine whose kernels differ from the eager reference: SDPA attention, one fused QKV GEMM, F.rms_norm,
torch's AdamW arithmetic order, an RNG-drawn micro-batch accumulation order):
- float64: rel 1e-9, max_rel 1e-8. Reordered fp64 reductions differ by ~1e-15 per op; a few AdamW
  steps and the HF weight fold keep that far below 1e-12. A wrong constant anywhere is >1e-4.
- float32: rel 2e-5, max_rel 1e-4. Measured on the tiny preset (CPU): logits 1e-7, gradients
  3e-7, final weights after 4 AdamW steps rel 4e-7 / max_rel 1e-5 (an Adam update of an element
  whose gradient is ~0 can flip sign), DP=2 vs DP=1 1e-6 / 2e-5. The red-team bugs sit at 1.9e-4
  (RoPE theta 1e6 at seq 16), 2.6e-4 (weight decay skipped on one matrix for 4 steps) and above.
- bfloat16: rel 5e-2, max_rel 1e-1. bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3) and
  the residual stream is rounded to bf16 after every add, so two correct implementations random-walk
  apart by ~u per layer. Measured (CPU): full MiniCPM4-0.5B (24 layers, hidden 1024), seq 128:
  logits rel 2.0e-2, last hidden state 1.9e-2 (max_rel 2.3e-2); the same depth at hidden 256:
  logits 6.5e-3, gradients 1.35e-2 (gradients ~2x the forward). On one H100 (seq 2048,
  benchmarks/results/gates/2026-11-23-h100-minicpm4-0.5b-bf16), both train_engine_0.5B and the base
  engine: logits 1.87e-2, worst gradient 3.4e-2, worst final weight after 4 steps max_rel 5.0e-2 (an
  Adam step of a near-zero gradient can flip sign: ~2 lr / max|w|). 5e-2 / 1e-1 is the smallest round
  pair above those (margins 1.5x on gradients, 2x on weights: deeper models may need more). It cannot see sub-percent bugs (a skipped
  weight decay); those are the fp32 gates' job (the tiny preset on CPU); structural bugs (a wrong
  RoPE theta at seq 2048, a non-causal mask, a wrong residual scale) are far above it. The bound is a
  parameter (`rel=X,max=Y`, GateOptions.rel_bound / max_bound) and every report records the one used.

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
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

DTYPE_BOUNDS: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-8),
    "float32": (2e-5, 1e-4),
    "bfloat16": (5e-2, 1e-1),
}
POLICY_NAMES = ("dtype", "bitwise")
ADAMW_STEP_SHARE = 0.25  # of the summed LRs: how far one weight element may differ after AdamW steps (see above)
_CHUNK = 1 << 24  # elements per chunk when reducing big tensors (0.5B logits are ~1.5e8 elements)


class Policy(BaseModel):
    """A resolved tolerance policy; `rel`/`max_rel` are None for bitwise."""

    model_config = ConfigDict(frozen=True)
    name: Literal["dtype", "bitwise"]
    dtype: str
    rel: float | None = Field(None, ge=0)
    max_rel: float | None = Field(None, ge=0)

    @property
    def bitwise(self) -> bool:
        return self.name == "bitwise"

    def describe(self) -> str:
        if self.bitwise:
            return "bitwise (every element equal)"
        return f"{self.dtype} bounds: rel <= {self.rel:g}, max_rel <= {self.max_rel:g}"


def resolve_policy(spec: str, dtype: str, rel: float | None = None, max_rel: float | None = None) -> Policy:
    """`spec` is `bitwise`, `dtype`, or `rel=X,max=Y` (either part optional, the rest from the dtype)."""
    spec = spec.strip()
    if spec == "bitwise":
        return Policy(name="bitwise", dtype=dtype)
    if dtype not in DTYPE_BOUNDS:
        raise ValueError(f"no default bounds for dtype {dtype!r}; one of {', '.join(DTYPE_BOUNDS)}")
    d_rel, d_max = DTYPE_BOUNDS[dtype]
    if spec != "dtype":
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, _, value = part.partition("=")
            if key not in ("rel", "max") or not value:
                raise ValueError(f"bad policy {spec!r}: expected `bitwise`, `dtype` or `rel=X,max=Y`")
            if key == "rel":
                d_rel = float(value)
            else:
                d_max = float(value)
    return Policy(name="dtype", dtype=dtype, rel=d_rel if rel is None else rel, max_rel=d_max if max_rel is None else max_rel)


class Diff(BaseModel):
    """One tensor compared: both error figures, the bound it was held to, and the verdict."""

    name: str
    shape: list[int]
    rel: float
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""

    def figures(self) -> str:
        return f"rel {self.rel:.3e}, max_abs {self.max_abs:.3e} (max_rel {self.max_rel:.3e})"


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


def adamw_step_cap(lrs: torch.Tensor) -> float:
    """The largest single-element difference allowed in a weight after AdamW steps at these LRs (see above)."""
    return ADAMW_STEP_SHARE * float(lrs.double().abs().sum())


def compare(name: str, a: torch.Tensor, b: torch.Tensor, policy: Policy, step_cap: float | None = None) -> Diff:
    """Engine tensor `a` against reference tensor `b` under `policy`. `step_cap` (weights after AdamW steps,
    non-bitwise policies only): `max_abs` within it satisfies the max criterion too (see above)."""
    if tuple(a.shape) != tuple(b.shape):
        return Diff(name=name, shape=list(b.shape), rel=float("inf"), max_abs=float("inf"), max_rel=float("inf"),
                    ok=False, note=f"shape {list(a.shape)} != reference {list(b.shape)}")
    sq_d, sq_b, max_d, max_b, equal = _stats(a, b)
    rel, max_rel = _ratio(sq_d**0.5, sq_b**0.5), _ratio(max_d, max_b)
    if any(x != x for x in (rel, max_d)):  # NaN anywhere
        return Diff(name=name, shape=list(b.shape), rel=float("nan"), max_abs=float("nan"), max_rel=float("nan"),
                    ok=False, note="NaN")
    if policy.bitwise:
        ok, note = equal, "" if equal else "not bit-identical"
    else:
        ok, note = _bounds(rel, max_rel, max_d, policy, step_cap)
    return Diff(name=name, shape=list(b.shape), rel=rel, max_abs=max_d, max_rel=max_rel, ok=ok, note=note)


def _bounds(rel: float, max_rel: float, max_abs: float, policy: Policy, step_cap: float | None) -> tuple[bool, str]:
    """(ok, note) under a non-bitwise policy; the note names every bound exceeded, and the step cap when it
    is what kept an element within bounds."""
    parts = []
    if rel > policy.rel:
        parts.append(f"rel {rel:.3e} > {policy.rel:g}")
    max_ok = max_rel <= policy.max_rel
    if not max_ok:
        over = f"max_rel {max_rel:.3e} > {policy.max_rel:g}"
        if step_cap is not None:
            max_ok = max_abs <= step_cap
            over += f" {'but' if max_ok else 'and'} max_abs {max_abs:.3e} {'<=' if max_ok else '>'} AdamW step cap {step_cap:.3e}"
        parts.append(over)
    return rel <= policy.rel and max_ok, "; ".join(parts)


def compare_series(name: str, a: torch.Tensor, b: torch.Tensor, policy: Policy) -> list[Diff]:
    """Per-step scalars (losses, grad norms, lrs): one Diff per step, named `name[t]`."""
    if a.shape != b.shape:
        return [compare(name, a, b, policy)]
    return [compare(f"{name}[{t}]", a[t], b[t], policy) for t in range(b.shape[0])]
