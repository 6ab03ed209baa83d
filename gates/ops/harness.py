"""The per-op harness, gates' side: checks and times one candidate of one op (an implementation of the engine's op
table and values of its declared tunables) in a child process (child.py, the engine's src alone on its path),
at the production shape first (the one timed) and at the harness's own edge shapes; keeps a leaderboard per op
in the export (`forge/leaderboards/<op>.json`).

The op table comes from the engine (`describe`), never from the candidate's claims: an unknown op, implementation
or parameter, or a value outside its declared domain, is an `OpSpecError` here before anything runs, and again
an error inside the engine.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from gates.engine_venv import engine_python
from gates.launch import Deadline, discover_engine, engine_env, run_process

CHILD = Path(__file__).with_name("child.py")
LEADERBOARDS = "forge/leaderboards"
# the harness's edge shapes (not the engine's): one token and an odd vocabulary; odd rows and widths with a
# vocabulary that is not a power of two but a multiple of 8 (what GEMM kernels with 16-byte strides can run)
EDGE_DIMS: tuple[tuple[str, dict], ...] = (
    ("edge 1x1", dict(batch=1, seq=1, hidden=40, ffn=72, heads=2, kv_heads=1, head_dim=20, vocab=131,
                      eps=1e-5, residual_scale=0.3, params=[[3], [5, 7]])),
    ("edge 3x5", dict(batch=3, seq=5, hidden=96, ffn=200, heads=6, kv_heads=2, head_dim=16, vocab=520,
                      eps=1e-6, residual_scale=0.7, params=[[33, 17], [1], [1025]])),
)


# runs the child: (argv, env to set, cwd (writable), timeout) -> (exit code or None, timed out, stderr tail);
# the forge loop passes one that runs it in the round's sandbox and records its process group
Runner = Callable[[list[str], dict[str, str], Path, float], tuple[int | None, bool, str]]


def run_plain(argv: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> tuple[int | None, bool, str]:
    proc = run_process(argv, cwd, env, Deadline(timeout_s))
    return proc.rc, proc.timed_out, proc.stderr


class OpSpecError(ValueError):
    """An op, implementation, parameter or value the engine's op table does not declare."""


class HarnessOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device: Literal["cpu", "cuda"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch: int = Field(1, ge=1, description="the production shape's micro batch")
    seq: int = Field(64, ge=1, description="the production shape's sequence length")
    reps: int = Field(20, ge=1)
    warmup: int = Field(3, ge=0)
    graph_below_ms: float = Field(0.1, description="CUDA: replay a graph of calls shorter than this")
    tolerance: float | None = Field(None, description="max relative error; None: the dtype's bound (child.py)")
    peaks: dict[str, float] = Field(default_factory=dict, description="tflops / gbps, for a device not in child.PEAKS")
    timeout_s: float = Field(600.0, gt=0)


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    op: str
    impl: str
    values: dict[str, Any] = Field(default_factory=dict)


class CandidateResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    op: str
    impl: str
    values: dict[str, Any]
    verdict: Literal["passed", "failed", "error"]
    message: str = ""
    values_used: dict[str, Any] = Field(default_factory=dict)
    shapes: list[dict] = Field(default_factory=list)
    timing: dict | None = None
    runtime: dict | None = None

    @property
    def ms(self) -> float | None:
        return self.timing["median_ms"] if self.verdict == "passed" and self.timing else None


class EngineOps(BaseModel):
    """The engine's op table as the harness sees it (child.py --describe)."""

    table: dict[str, dict]
    runtime: dict[str, dict]
    registered: dict[str, list[str]]
    resolved: dict[str, dict] = Field(default_factory=dict)  # device -> {names, tuned}: what `auto` runs
    not_run: list[str] = Field(default_factory=list)  # ops of the table the engine's model never calls (at this TP)

    def unknown(self, op: str) -> str | None:
        """Why `op` (or `op.site`) is no op of this engine's to check or tune, or None."""
        base = op.partition(".")[0]
        if base in self.table:
            return None
        if base in self.not_run:
            return f"op {op!r}: the engine's model does not run it (at this tensor-parallel degree); it runs {', '.join(self.table)}"
        return f"unknown op {op!r}; the engine's ops: {', '.join(self.table)}"

    def default_candidate(self, op: str, device: str) -> Candidate | None:
        """The candidate the engine runs by default for `op` on `device` (its implementation and tuned values),
        or None when that is the reference, unfused, or fused into another op: nothing to check against itself."""
        res = self.resolved.get(device, {})
        impl = res.get("names", {}).get(op)  # None for a sited op named without its site ("gemm")
        if impl is None or impl in ("reference", "unfused") or impl.startswith("("):
            return None
        return Candidate(op=op, impl=impl, values=res.get("tuned", {}).get(f"{op.partition('.')[0]}={impl}", {}))

    def space(self, op: str, impl: str) -> dict[str, dict]:
        return self.impl(op, impl)["space"]

    def impl(self, op: str, impl: str) -> dict:
        if (why := self.unknown(op)) is not None:
            raise OpSpecError(why)
        impls = self.table[op.partition(".")[0]]["impls"]
        if impl not in impls:
            raise OpSpecError(f"{op}: unknown implementation {impl!r}; declared: {', '.join(impls)}")
        return impls[impl]

    def check(self, c: Candidate) -> None:
        """Raises OpSpecError naming the first unknown name or out-of-domain value."""
        space = self.space(c.op, c.impl)
        for name, value in c.values.items():
            if name not in space:
                raise OpSpecError(f"{c.op}={c.impl}: unknown parameter {name!r}; declared: {', '.join(space) or 'none'}")
            if not any(_same(_norm(value), _norm(v)) for v in space[name]["domain"]):
                raise OpSpecError(f"{c.op}={c.impl}: {name}={value!r} is outside the declared domain {space[name]['domain']}")


def _norm(v: Any) -> Any:
    return tuple(_norm(x) for x in v) if isinstance(v, (list, tuple)) else v


def _same(a: Any, b: Any) -> bool:  # as the engine's table.same: a bool only equals a bool
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def describe(engine_dir: Path, timeout_s: float = 300.0, runner: Runner = run_plain, tp: int = 1) -> EngineOps:
    """The engine's op table, as its model runs at tensor-parallel degree `tp` (child.py --describe)."""
    engine = discover_engine(engine_dir)
    with tempfile.TemporaryDirectory(prefix="forge-ops-") as tmp:
        out = Path(tmp) / "table.json"
        rc, _, stderr = runner([str(engine_python(engine)), str(CHILD), "--describe", engine.package, str(out), str(tp)],
                               engine_env(engine),
                               Path(tmp), timeout_s)
        if rc != 0 or not out.is_file():
            raise OpSpecError(f"engine {engine_dir}: cannot read its op table (exit {rc}): {stderr[-800:]}")
        return EngineOps.model_validate_json(out.read_text())


def production_dims(preset: str, batch: int, seq: int) -> dict:
    """The model's shapes (gates' own copy of its config) at (batch, seq)."""
    from gates.model_config import preset as model_preset

    cfg = model_preset(preset)
    return dict(batch=batch, seq=seq, hidden=cfg.hidden_size, ffn=cfg.ffn_hidden_size, heads=cfg.num_heads,
                kv_heads=cfg.num_kv_heads, head_dim=cfg.dim_head, vocab=cfg.vocab_size, eps=cfg.rms_norm_eps,
                residual_scale=cfg.residual_scale, params=[[cfg.vocab_size, cfg.hidden_size], [cfg.hidden_size],
                                                           [cfg.ffn_hidden_size, cfg.hidden_size]])


def check_candidate(engine_dir: Path, candidate: Candidate, *, preset: str, options: HarnessOptions,
                    engine_ops: EngineOps | None = None, runner: Runner = run_plain) -> CandidateResult:
    """Correctness at the production shape and the edge shapes, then the harness's timing; never raises for a
    bad candidate (verdict failed / error), raises OpSpecError for names the engine does not declare."""
    (engine_ops or describe(engine_dir, runner=runner)).check(candidate)
    engine = discover_engine(engine_dir)
    shapes = [(f"production {options.batch}x{options.seq}", production_dims(preset, options.batch, options.seq)),
              *EDGE_DIMS]
    request = candidate.model_dump() | options.model_dump(exclude={"timeout_s", "batch", "seq"}) | {
        "package": engine.package, "shapes": shapes}
    with tempfile.TemporaryDirectory(prefix="forge-op-") as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        env = engine_env(engine) | ({"TRITON_INTERPRET": "1"} if options.device == "cpu" else {})
        rc, timed_out, stderr = runner([str(engine_python(engine)), str(CHILD), str(req), str(out)], env, Path(tmp),
                                       options.timeout_s)
        base = candidate.model_dump()
        if timed_out:
            return CandidateResult(**base, verdict="error", message=f"timed out after {options.timeout_s:.0f} s")
        if rc != 0 or not out.is_file():
            return CandidateResult(**base, verdict="error", message=f"the harness child exited {rc}: {stderr[-1500:]}")
        return CandidateResult.model_validate_json(out.read_text())


# ---- leaderboards ---------------------------------------------------------------------------------------


def leaderboard_path(engine_dir: Path, op: str) -> Path:
    return Path(engine_dir) / LEADERBOARDS / f"{op}.json"


def record(engine_dir: Path, result: CandidateResult, *, options: HarnessOptions, source: str) -> dict:
    """Add `result` to its op's leaderboard (one row per implementation and values, the latest kept); returns it."""
    path = leaderboard_path(engine_dir, result.op)
    board = json.loads(path.read_text()) if path.is_file() else {"op": result.op, "entries": []}
    row = {"impl": result.impl, "values": result.values, "values_used": result.values_used,
           "verdict": result.verdict, "message": result.message, "ms": result.ms, "timing": result.timing,
           "shapes": result.shapes, "runtime": result.runtime, "source": source,
           "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    same = lambda e: e["impl"] == row["impl"] and e["values"] == row["values"]  # noqa: E731
    board["entries"] = [e for e in board["entries"] if not same(e)] + [row]
    board["entries"].sort(key=lambda e: (e["ms"] is None, e["ms"] or 0.0))
    board |= {"hardware": {"device": (result.runtime or {}).get("device"), "host": platform.node(),
                           "machine": platform.machine()},
              "versions": {k: v for k, v in (result.runtime or {}).items() if k != "device"},
              "harness": options.model_dump(), "best": next((e for e in board["entries"] if e["ms"] is not None), None)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(board, indent=1, default=str) + "\n")
    return board
