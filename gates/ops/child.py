"""The per-op harness's engine-side process: `python child.py REQUEST.json RESULT.json`, with only the engine's src
on PYTHONPATH. It imports torch and the engine's op table, nothing of forge (the file is run by path), checks one
candidate (an implementation and its tunable values) against the op's reference and times it on its own clock.

Correctness, per shape: fresh random inputs (a seed from os.urandom, recorded), the reference run first, then the
allocator poisoned (blocks the size of every output filled with NaN and freed, so an output the candidate
allocates and leaves unwritten is NaN: certain on CUDA's caching allocator, likely on a CPU's malloc), then the
candidate; every output and gradient must be finite where the reference's is and within the dtype's bound of it
(max |a - b| / max |b|), or, in half precision, as close to the reference's float32 twin as the reference itself
is, within TWIN_FACTOR. A shape the implementation declares it cannot run (the table's `Impl.supports`) is
recorded `unsupported`; the production shape and at least one edge shape must run.
Timing, at the production shape, on the engine's own clock (`<package>.core.timer`, its vendored copy of
engine_core's): the median of `reps` calls after `warmup`. CPU: perf_counter around each call. CUDA (GPU-only path,
`_cuda_times`): the L2 flushed before each call, CUDA events around it, and a CUDA graph of the call replayed when
one call takes under `graph_below_ms`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType

import torch

TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}
TWIN_FACTOR = 2.0  # beyond TOLERANCE, a candidate may err vs the float32 twin this many times the reference's own
PEAKS = {  # device name substring -> (dense bf16 TFLOP/s, HBM GB/s); DESIGN.md's MFU peak for Hopper
    "H200": (989.4, 4800.0), "H100": (989.4, 3350.0)}


_CHUNK = 1 << 26  # elements compared at a time in float64: a production-shape CE gradient has 2.4 G of them


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| over the elements where b is finite, in float64, chunk by chunk (bounded memory)."""
    a, b = a.reshape(-1), b.reshape(-1)
    diff = scale = 0.0
    for i in range(0, b.numel(), _CHUNK):
        x, y = a[i:i + _CHUNK].double(), b[i:i + _CHUNK].double()
        finite = torch.isfinite(y)
        diff = max(diff, torch.where(finite, (x - y).abs(), 0.0).max().item())
        scale = max(scale, torch.where(finite, y.abs(), 0.0).max().item())
    return diff / (scale if scale else 0.5) if b.numel() else 0.0


def _poison(outputs: list[torch.Tensor]) -> None:
    """Fill blocks of the outputs' sizes with NaN and free them: the candidate's next allocations get them."""
    blocks = [torch.full(o.shape, float("nan"), dtype=o.dtype, device=o.device) if o.is_floating_point()
              else torch.full(o.shape, -7, dtype=o.dtype, device=o.device) for o in outputs]
    del blocks


def _mismatch(got: list[torch.Tensor], want: list[torch.Tensor]) -> str | None:
    """Why the outputs cannot be compared by value with the reference's (count, shape, dtype, non-finite where
    the reference is finite), or None."""
    if len(got) != len(want):
        return f"{len(got)} outputs and gradients, the reference has {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"output {i}: {tuple(a.shape)} {a.dtype}, the reference's {tuple(b.shape)} {b.dtype}"
        if a.is_floating_point() and not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return f"output {i}: non-finite values where the reference's are finite (NaN never passes)"
    return None


def _check(got: list[torch.Tensor], want: list[torch.Tensor], bound: float) -> tuple[float, str | None]:
    if (why := _mismatch(got, want)) is not None:
        return float("inf"), why
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        err = _rel(a, b)  # non-finite only where the reference's are (checked above): compared where finite
        worst = max(worst, err)
        if not err <= bound:
            return worst, f"output {i}: max relative error {err:.3e} > {bound:g}"
    return worst, None


def _check_by_twin(got: list[torch.Tensor], want: list[torch.Tensor], exact: list[torch.Tensor], bound: float,
                   factor: float = TWIN_FACTOR) -> tuple[str | None, list[dict]]:
    """A half-precision output off the half-precision reference's by more than the dtype's `bound` still passes
    when it is as close to the reference's float32 twin (same draws, not rounded) as the reference itself is,
    within `factor`: two roundings of the same math may disagree by more than either errs."""
    rows = []
    for i, (a, b, x) in enumerate(zip(got, want, exact)):
        if not a.is_floating_point() or _rel(a, b) <= bound:
            continue
        own, ref = _rel(a, x), _rel(b, x)
        rows.append({"output": i, "rel_err_vs_float32": own, "reference_rel_err_vs_float32": ref})
        if not own <= factor * ref:
            return (f"output {i}: relative error vs the float32 twin {own:.3e} > {factor:g} x the reference's own "
                    f"{ref:.3e}"), rows
    return None, rows


def _cuda_times(timer: ModuleType, run, reps: int, warmup: int, graph_below_ms: float) -> tuple[object, bool]:
    """GPU-only: the Timing of `run` (of a CUDA graph of it when one call is short) and whether it was graphed."""
    flush = timer.L2_FLUSH_BYTES
    probe = timer.time_calls(run, device="cuda", reps=3, warmup=warmup, l2_flush_bytes=flush)
    call, graphed = run, False
    if probe.median_ms < graph_below_ms:
        try:
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                run()  # warm the capture stream
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                run()
            call, graphed = graph.replay, True
        except Exception:  # noqa: BLE001 - not capturable (host syncs, CPU tables): timed eagerly
            torch.cuda.synchronize()
    # a graph's first replay uploads it: one untimed replay
    return timer.time_calls(call, device="cuda", reps=reps, warmup=1 if graphed else 0, l2_flush_bytes=flush), graphed


def _roofline(flops: float, nbytes: float, ms: float, device: str, peaks: dict) -> dict:
    """Throughput and % of the roofline (the larger of the compute and memory fractions); None without peaks."""
    tflops, gbps = flops / ms / 1e9, nbytes / ms / 1e6
    known = next((p for name, p in PEAKS.items() if name in device), (None, None))
    peak_tflops, peak_gbps = peaks.get("tflops") or known[0], peaks.get("gbps") or known[1]
    out = {"tflops": tflops, "gbps": gbps, "roofline_pct": None, "bound": None}
    if peak_tflops and peak_gbps:
        compute, memory = tflops / peak_tflops, gbps / peak_gbps
        out |= {"roofline_pct": 100.0 * max(compute, memory), "bound": "compute" if compute >= memory else "memory"}
    return out


def main(request_path: str, result_path: str) -> int:
    req = json.loads(Path(request_path).read_text())
    pkg = req["package"]
    result: dict = {"op": req["op"], "impl": req["impl"], "values": req["values"]}
    shapes: list[dict] = []  # each shape's outcome so far: a crash says at which shape it came
    at = None
    try:
        registry = importlib.import_module(f"{pkg}.ops.registry")
        cases = importlib.import_module(f"{pkg}.ops.cases")
        space = importlib.import_module(f"{pkg}.ops.space")
        table = importlib.import_module(f"{pkg}.ops.table")
        timer = importlib.import_module(f"{pkg}.core.timer")
        device, dtype = req["device"], getattr(torch, req["dtype"])
        key = space.runtime_key(device).model_dump()
        result["runtime"] = key
        op, site = req["op"].partition(".")[0], req["op"]
        values = table.check_values(op, req["impl"], req["values"])  # unknown names: an error, as in the engine
        impls = registry.OPS[op]
        if req["impl"] not in impls or impls[req["impl"]] is None:
            why = registry.UNAVAILABLE.get((op, req["impl"]), "not a callable implementation")
            raise ValueError(f"{op}={req['impl']} cannot run here: {why}")
        candidate, reference = impls[req["impl"]], impls["reference"]
        if reference is None:
            raise ValueError(f"{op} has no callable reference to check against")
        declared = {n: p.default for n, p in table.spec(op).impl(req["impl"]).space.items()}
        space.activate({(op, req["impl"]): declared | values} if declared else {})
        result["values_used"] = {n: space.value(op, req["impl"], n) for n in declared}
        bound = req.get("tolerance") or TOLERANCE[req["dtype"]]
        supports = table.spec(op).impl(req["impl"]).supports or (lambda d: None)
        for i, (label, dims) in enumerate(req["shapes"]):
            at, d = label, _dims(cases, dims)
            if (cannot := supports(d)) is not None:
                shapes.append({"shape": label, "unsupported": cannot})
                if i == 0:  # the production shape is the point
                    result |= {"verdict": "failed", "shapes": shapes, "message": f"{label}: {cannot}"}
                    return _write(result_path, result)
                continue
            seed = int.from_bytes(os.urandom(4), "little")
            call = cases.build(site, d, dtype, device, seed)
            want = call.run(reference)
            _poison(want)
            got = call.run(candidate)
            err, why = _check(got, want, bound)
            checked = {"shape": label, "seed": seed, "max_rel_err": err, "error": why}
            if why and dtype != torch.float32 and _mismatch(got, want) is None:
                exact = cases.build(site, d, torch.float32, device, seed).run(reference)
                why, checked["twin"] = _check_by_twin(got, want, exact, bound)
                checked["error"] = why
            shapes.append(checked)
            if why:
                result |= {"verdict": "failed", "shapes": shapes, "message": f"{label}: {why}"}
                return _write(result_path, result)
        if len(req["shapes"]) > 1 and all("unsupported" in c for c in shapes[1:]):
            result |= {"verdict": "failed", "shapes": shapes, "message": "it runs none of the edge shapes"}
            return _write(result_path, result)
        label, dims = req["shapes"][0]
        at = f"{label} (timing)"
        call = cases.build(site, _dims(cases, dims), dtype, device, 0)
        run = call.timed(candidate)  # inputs made once: the clock sees the op, not copies
        if device == "cuda":
            timing, graphed = _cuda_times(timer, run, req["reps"], req["warmup"], req["graph_below_ms"])
        else:
            timing, graphed = timer.time_calls(run, device="cpu", reps=req["reps"], warmup=req["warmup"]), False
        ms = timing.median_ms
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        result |= {"verdict": "passed", "shapes": shapes, "message": f"correct at {len(shapes)} shapes",
                   "timing": {"shape": label, "median_ms": ms, "min_ms": timing.min_ms, "reps": timing.reps,
                              "graphed": graphed, "l2_flushed": timing.l2_flushed, "clock": timing.clock,
                              "flops": call.flops, "bytes": call.bytes,
                              **_roofline(call.flops, call.bytes, ms, name, req.get("peaks", {}))}}
    except Exception as e:  # noqa: BLE001 - a candidate that crashes is a failed candidate, with its traceback
        where = f"{at}: " if at else ""
        result |= {"verdict": "failed", "message": f"{where}{type(e).__name__}: {e}"[:2000], "shapes": shapes,
                   "traceback": traceback.format_exc()[-4000:]}
    return _write(result_path, result)


def _dims(cases: ModuleType, raw: dict) -> object:
    """The request's shape (JSON: lists) as the engine's cases.Dims."""
    return cases.Dims(**{k: tuple(map(tuple, v)) if k == "params" else v for k, v in raw.items()})


def _write(path: str, result: dict) -> int:
    Path(path).write_text(json.dumps(result, default=str, indent=1) + "\n")
    return 0


def describe(package: str, result_path: str, tp: int = 1) -> int:
    """The engine's op table and this runtime's key, as JSON: the ops its model runs at tensor-parallel degree `tp`
    (the package's `registry_ops(tp)` where it declares one, else every op of the table), those it does not, and
    what `auto` runs (the package's AUTO_UNFUSED ops unfused)."""
    engine = importlib.import_module(package)
    runs = getattr(engine, "registry_ops", None)
    table = importlib.import_module(f"{package}.ops.table")
    registry = importlib.import_module(f"{package}.ops.registry")
    space = importlib.import_module(f"{package}.ops.space")
    # what `auto` runs, with the tuned values this runtime's entry gives (fused ops the engine leaves unfused at auto)
    selection = registry.OpSelection(**dict.fromkeys(getattr(engine, "AUTO_UNFUSED", ()), registry.UNFUSED))
    resolved = {}
    for device in ("cpu", "cuda"):
        ops = registry.resolve(selection, device)
        resolved[device] = {"names": ops.names, "tuned": ops.tuned}
    described = table.describe()
    keep = set(runs(tp)) if runs is not None else set(described)
    return _write(result_path, {"table": {op: d for op, d in described.items() if op in keep},
                                "not_run": sorted(set(described) - keep), "runtime": {d: space.runtime_key(d).model_dump()
                                                                       for d in ("cpu", "cuda")},
                                "registered": {op: sorted(impls) for op, impls in registry.OPS.items()},
                                "resolved": resolved})


if __name__ == "__main__":
    sys.exit(describe(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:5])) if sys.argv[1] == "--describe"
             else main(sys.argv[1], sys.argv[2]))
