"""Stage 2's integration gate for one candidate, outside the loop: the whole step before and after it, on the gates'
clock (M5's speed part: `pretrain` at its defaults, timed from outside, its timed steps' losses checked against
the reference), decided by the loop's own rule (harness/election.py: elected only when faster than the baseline by
more than ELECTION_MARGIN); optionally M5's loss part on the candidate. The loop's ops stage runs the same
steps per round; one of its rounds (search, gates, two timings) does not fit a 600 s device call, this does.

The candidate is an engine copy whose tuned-config file (engine_core/ops/space.py) holds the candidate's values
under this runtime's key: from a tune run (`--tuned DIR/tuned/configs.json`) or one op (`--set OP=IMPL --values JSON`).

    python3 -m benchmarks.gpu.elect --out DIR --set linear_cross_entropy=quack_triton --values '{"lse_epilogue": false}'
    python3 -m benchmarks.gpu.elect --out DIR --tuned RUN/tuned/configs.json --order before,after,before
    python3 -m benchmarks.gpu.elect --out DIR --device cpu --case tiny --cpu-peak-tflops 0.01 --set ...  # CPU check

Writes DIR/election.json as it goes (each timing as it ends): the candidate, every timing's numbers, the decision;
and DIR/candidate_tuned.json, the candidate's tuned-config file (its engine copy is removed at the end: a GPU
call's bundle carries the report, not a second copy of the engine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "exports" / "train_engine_0.5B"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engine", type=Path, default=ENGINE)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--tuned", type=Path, help="a tuned-config file (tune_ops' tuned/configs.json): its entry for "
                       "this runtime is the candidate")
    which.add_argument("--set", metavar="OP=IMPL", help="one op's implementation, with --values")
    ap.add_argument("--values", default="{}", help="JSON object of the op's parameters (with --set)")
    ap.add_argument("--order", default="before,after", help="the timings, in order (before / after, comma-separated); "
                    "before,after,before shows the clock's drift")
    ap.add_argument("--loss-steps", type=int, default=0, help="also run M5's loss part on the candidate, this many steps")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--case", default="minicpm4-0.5b")
    ap.add_argument("--global-batch-size", type=int, default=64)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--speed-steps", type=int, default=10)
    ap.add_argument("--target-s", type=float, default=None, help="M5's timed window (default: the gates' own)")
    ap.add_argument("--cpu-peak-tflops", type=float, default=None, help="a CPU check: a nominal peak so M5 times there")
    ap.add_argument("--gate-timeout-s", type=float, default=540.0, help="each gate's budget")
    ap.add_argument("--sandbox", default=None, help="required | preferred | off (default: the gates' default)")
    a = ap.parse_args(argv)
    if any(w not in ("before", "after") for w in a.order.split(",")) or "after" not in a.order.split(","):
        ap.error("--order: before / after, comma-separated, with at least one after")
    return a


def candidate_ops(a: argparse.Namespace, key: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{op: {impl: values}}: the tuned file's entry for `key`, or the one op of --set."""
    if a.tuned is not None:
        entries = json.loads(a.tuned.read_text())["entries"]
        ops = next((e["ops"] for e in entries if e["key"] == key), None)
        if not ops:
            raise SystemExit(f"--tuned {a.tuned}: no entry for this runtime {key} (entries: {[e['key'] for e in entries]})")
        return ops
    op, sep, impl = a.set.partition("=")
    if not sep or not impl:
        raise SystemExit(f"--set {a.set!r}: OP=IMPL")
    values = json.loads(a.values)
    if not isinstance(values, dict):
        raise SystemExit("--values: a JSON object")
    return {op: {impl: values}}


def candidate_engine(engine: Path, out: Path, key: dict[str, Any], ops: dict) -> Path:
    """A copy of `engine` under `out` whose tuned-config file holds `ops` under `key` (the engine checks every
    name and value against its declared spaces when it resolves its ops)."""
    from gates.launch import discover_engine, engine_cache_dir, seed_engine_cache
    from gates.ops.harness import Candidate, OpSpecError, describe
    from harness.agents.tune import write_tuned

    declared = describe(engine)
    for op, impls in ops.items():
        for impl, values in impls.items():
            try:
                declared.check(Candidate(op=op, impl=impl, values=values))
            except OpSpecError as e:
                raise SystemExit(f"the candidate {op}={impl} {values}: {e}") from None
    dst = out / "candidate" / engine.name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(engine, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".venv"))
    tuned = dst / "src" / discover_engine(dst).package / "tuned" / "configs.json"
    for op, impls in ops.items():
        for impl, values in impls.items():
            write_tuned(tuned, key, op, impl, values, note="a candidate of stage 2's integration gate (elect.py)")
    # The gates keep a compile cache per engine location: the copy starts from the engine's, not cold.
    seed_engine_cache(discover_engine(dst), engine_cache_dir(discover_engine(engine)))
    return dst


def idle_ops(engine: Path, ops: dict, device: str) -> list[str]:
    """The candidate's ops whose implementation the step does not run on `device` (`auto` picks another there):
    their values cannot change the step, so the loop does not time them (harness/election.py `_tuned_but_idle`)."""
    from gates.ops.harness import describe

    names = describe(engine).resolved.get(device, {}).get("names", {})
    return [f"{op}={impl} (the step runs {names.get(op)})" for op, impls in ops.items() for impl in impls
            if names.get(op) != impl]


def time_step(engine: Path, a: argparse.Namespace) -> dict:
    """M5's speed part on `engine` (harness/timing.py, as the loop's clock): its verdict, message and numbers."""
    from gates.launch import discover_engine
    from gates.options import GateOptions
    from harness.timing import speed_part_on

    options = GateOptions(case=a.case, device=a.device, timeout_s=a.gate_timeout_s, mfu_threshold=0.0,
                          speed_global_batch_size=a.global_batch_size, speed_micro_batch_size=a.micro_batch_size,
                          speed_seq_length=a.seq_length, speed_steps=a.speed_steps, speed_target_timed_s=a.target_s,
                          cpu_peak_tflops=a.cpu_peak_tflops, **({"sandbox": a.sandbox} if a.sandbox else {}))
    t0 = time.monotonic()
    part = speed_part_on(discover_engine(engine), options)
    return {"verdict": part.verdict, "message": part.message, "numbers": part.numbers, "gate_s": time.monotonic() - t0}


def decide(timings: list[dict]) -> dict:
    """The loop's rule on the step times (harness/election.py): the candidate's best 'after' against the
    baseline's best 'before'; a timing that did not pass has no time."""
    from harness.election import ELECTION_MARGIN, beats

    def best(which: str) -> float | None:
        times = [t["numbers"]["step_time_s"] for t in timings if t["which"] == which and t["verdict"] == "passed"
                 and "step_time_s" in t["numbers"]]
        return min(times) if times else None

    before, after = best("before"), best("after")
    if before is None or after is None:
        return {"elected": False, "before_step_s": before, "after_step_s": after, "margin": ELECTION_MARGIN,
                "why": "a side has no time on the gates' clock: nothing to elect"}
    elected = beats(after, before, minimize=True)
    return {"elected": elected, "before_step_s": before, "after_step_s": after, "speedup": before / after,
            "margin": ELECTION_MARGIN, "why": "faster on the gates' clock by more than the margin" if elected else
            "not faster on the gates' clock by more than the margin"}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    sys.path.insert(0, str(REPO))
    from engine_core.ops.space import runtime_key

    a.out.mkdir(parents=True, exist_ok=True)
    key = runtime_key(a.device).model_dump()
    ops = candidate_ops(a, key)
    after = candidate_engine(a.engine.resolve(), a.out, key, ops)
    try:
        return elect(a, key, ops, after)
    finally:
        from gates.launch import remove_engine_caches

        tuned = next((after / "src").glob("*/tuned/configs.json"), None)
        if tuned is not None:
            shutil.copyfile(tuned, a.out / "candidate_tuned.json")
        remove_engine_caches(after)
        shutil.rmtree(a.out / "candidate", ignore_errors=True)


def elect(a: argparse.Namespace, key: dict[str, Any], ops: dict, after: Path) -> int:
    """Time the step before and after the candidate engine `after`, in `a.order`; the loss part; the decision."""
    report: dict[str, Any] = {"engine": str(a.engine), "runtime_key": key, "candidate": ops,
                              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                              "timings": []}
    path = a.out / "election.json"
    idle = idle_ops(after, ops, a.device)
    if idle and len(idle) == sum(len(i) for i in ops.values()):
        report["decision"] = {"elected": False, "why": f"nothing to elect: {'; '.join(idle)}"}
        path.write_text(json.dumps(report, indent=1, default=str))
        print(f"[elect] not elected: {report['decision']['why']}", flush=True)
        return 0
    report["idle"] = idle
    for which in a.order.split(","):
        t = time_step(a.engine.resolve() if which == "before" else after, a) | {"which": which}
        report["timings"].append(t)
        n = t["numbers"]
        print(f"[elect] {which}: {t['verdict']}, step {n.get('step_time_s')}, {n.get('tokens_per_s')} tokens/s "
              f"({t['gate_s']:.0f} s)", flush=True)
        path.write_text(json.dumps(report | {"decision": decide(report["timings"])}, indent=1, default=str))
    if a.loss_steps:
        from gates.options import GateOptions
        from gates.runner import run_gate

        r = run_gate("m5_long_train", after, GateOptions(
            case=a.case, device=a.device, timeout_s=a.gate_timeout_s, m5_parts="loss", long_train_steps=a.loss_steps,
            **({"sandbox": a.sandbox} if a.sandbox else {})))
        report["loss_part"] = {"verdict": next((p.verdict for p in r.parts if p.name == "loss"), r.verdict),
                               "message": next((p.message for p in r.parts if p.name == "loss"), r.message),
                               "numbers": next((p.numbers for p in r.parts if p.name == "loss"), {})}
        print(f"[elect] M5 loss part on the candidate: {report['loss_part']['verdict']}", flush=True)
    decision = decide(report["timings"])
    if decision["elected"]:  # faster; the loop also needs M5's loss part to hold on the candidate
        loss = report.get("loss_part", {}).get("verdict")
        if loss != "passed":
            decision |= {"elected": False, "why": "faster on the gates' clock, but M5's loss part "
                         + ("was not run (--loss-steps)" if loss is None else f"is {loss} on the candidate")}
    report["decision"] = decision
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"[elect] {'elected' if decision['elected'] else 'not elected'}: {decision['why']} "
          f"(before {decision['before_step_s']}, after {decision['after_step_s']})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
