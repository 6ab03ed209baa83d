"""M8 resume: `pretrain` stopped and resumed across processes equals an uninterrupted run, bit for bit.

Case (preset): one rank, two micro batches per step, at least 6 steps; each step's batch ignores a
distinct number of labels, so the `valid_tokens` a step logs names the batch it trained on.

Runs (each its own process, the engine's defaults plus the spec's production flags and `--deterministic`: a
bitwise comparison of two processes needs run-to-run determinism, which GPU defaults trade for speed (atomics in
attention's backward); the production numerics are M5's and M7's to check):
- A: `pretrain` straight through, T steps;
- B: `--exit-after-steps k` (k = T // 2), then a new process with `--resume` to T;
- C: `--save-interval 1`, SIGKILLed (whole process tree) the moment its save directory changes after
  step 2 is logged, i.e. while it writes a checkpoint; then a new process with `--resume` to T.

Parts (all bitwise, whatever the policy):
- `resume`: B's log (steps 1..T: loss, grad norm, lr) and `dump-state` of B's final checkpoint (master
  weights and both AdamW moments) equal A's.
- `data_position`: every step after the resume trained on its own batch (valid-token counts): no batch
  replayed or skipped.
- `kill_during_save`: the resumed C continues from a checkpoint (not from step 1), and its log and final
  state equal A's. A resume that crashes on what the kill left is `failed`: the last good checkpoint must
  survive any kill.
"""

from __future__ import annotations

import torch

from gates.case import hf_param_shapes
from gates.context import GateRun, GateStop, localize_training, part
from gates.pretrain_runs import PretrainBox, data_position, run_killed_in_save
from gates.probe import EXIT_UNSUPPORTED
from gates.policies import compare
from gates.report import GateReport, Localization, Part, worst

SERIES = ["losses", "grad_norms", "lrs"]
MIN_STEPS = 6
DETERMINISTIC = "--deterministic"  # the training contract's switch


def distinct_counts(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Labels (steps, ranks, rows, seq) where step t ignores exactly 2t + 1 more tokens than none: each
    step's valid-token count is its own."""
    out = labels.clone()
    out[out == -100] = 0  # any real id: the count below decides the ignored ones
    gen = torch.Generator().manual_seed(seed + 3)
    for t in range(out.shape[0]):
        flat = out[t].view(-1)
        flat[torch.randperm(flat.numel(), generator=gen)[: 2 * t + 1]] = -100
    return out


def run(g: GateRun) -> GateReport:
    case = g.make_case(world_size=1, steps=max(g.options.steps, MIN_STEPS), grad_accum=2)
    case.batches["labels"] = distinct_counts(case.batches["labels"], case.spec.seed)
    spec, T = case.spec, case.spec.steps
    k = T // 2
    box = PretrainBox(g, case)
    extra = [*g.options.pretrain_args, DETERMINISTIC]  # last: it wins over a spec's --no-deterministic
    bitwise = g.policy.model_copy(update={"name": "bitwise", "rel": None, "max_rel": None})
    names = [f"{kind}.{n}" for n in hf_param_shapes(spec.model) for kind in ("weight", "exp_avg", "exp_avg_sq")]

    box.run("A", "engine pretrain (uninterrupted)", extra=extra)
    a_log = box.series("A", 1, T, "uninterrupted pretrain")
    a_state, _ = box.state("A", "engine dump-state (uninterrupted)")
    missing = [n for n in names if n not in a_state]
    if missing:
        raise GateStop("failed", f"dump-state has no {missing[0]} ({len(missing)} of {len(names)} tensors missing)",
                       localization=Localization(what=f"dump-state: no {missing[0]}"))

    parts = [resume_parts(g, box, a_log, a_state, names, bitwise, k, extra),
             kill_part(g, box, a_log, a_state, names, bitwise, extra)]
    flat = [p for group in parts for p in group[0]]
    g.report.parts = flat
    verdict = worst([p.verdict for p in flat])
    if verdict == "passed":
        return g.finish("passed", f"stopped after {k} of {T} steps and resumed, and killed during a save and resumed: "
                        "bit-identical to the uninterrupted run (log, weights, moments), no batch replayed or skipped")
    loc = next((loc for ps, loc in parts if loc is not None and any(p.verdict == "failed" for p in ps)), None)
    return g.finish(verdict, "; ".join(f"{p.name}: {p.verdict}" for p in flat), loc)


def _final(g: GateRun, box: PretrainBox, log_name: str, save: str, role: str, a_log, a_state, names, bitwise,
           first: int, label: str) -> tuple[Part, Localization | None]:
    """A resumed process's log (steps first..T) and its save dir's final state against A's, bitwise."""
    T = box.case.spec.steps
    log = box.series(log_name, first, T, role)
    state, meta = box.state(save, f"engine dump-state ({label})")
    s = [compare(f"{label}:{n}[{t - 1}]", log[n][t - first], a_log[n][t - 1], bitwise)
         for t in range(first, T + 1) for n in SERIES]
    g.report.tensors += s
    got = {n: state.get(n, torch.empty(0)) for n in names}
    w = g.compare_names(names, got, a_state, box.case, bitwise, prefix=f"{label}:")
    p = part(label, s + w)
    if meta.get("step") != T:
        p.verdict, p.message = "failed", f"dump-state says step {meta.get('step')!r}; the run ended at step {T}"
    return p, localize_training(s, w, f"{label} vs uninterrupted (bitwise): ")


def resume_parts(g: GateRun, box: PretrainBox, a_log, a_state, names, bitwise, k: int,
                 extra: list[str]) -> tuple[list[Part], Localization | None]:
    T = box.case.spec.steps
    try:
        box.run("B", f"engine pretrain --exit-after-steps {k}", args=box.args("B", [*extra, "--exit-after-steps", str(k)]))
        first = box.series("B", 1, k, "pretrain --exit-after-steps")
        box.run("B2", "engine pretrain --resume", args=box.args("B", [*extra, "--resume"], log="B2"))
        after = box.series("B2", k + 1, T, "pretrain --resume")
    except GateStop as stop:
        v = "failed" if stop.verdict in ("failed", "unsupported") else stop.verdict
        return [Part(name="resume", verdict=v, message=stop.message)], stop.localization
    where = data_position(after["valid_tokens"], box.case, k + 1)
    data = Part(name="data_position", verdict="failed" if where else "passed",
                message=where or f"steps {k + 1}..{T} after the resume each trained on their own batch")
    s0 = g.compare_names(SERIES, first, {n: a_log[n][:k] for n in SERIES}, box.case, bitwise, prefix="resume:")
    p, loc = _final(g, box, "B2", "B", "pretrain --resume", a_log, a_state, names, bitwise, k + 1, "resume")
    if s0 and not all(d.ok for d in s0):
        p.verdict, p.message = "failed", f"the first {k} steps already differ from the uninterrupted run; " + p.message
    if where:
        loc = Localization(what=f"data position after the resume at step {k}: {where}", step=k)
    return [p, data], loc


def kill_part(g: GateRun, box: PretrainBox, a_log, a_state, names, bitwise,
              extra: list[str]) -> tuple[list[Part], Localization | None]:
    seen = run_killed_in_save(g, box, "C", box.args("C", [*extra, "--save-interval", "1"]),
                              "engine pretrain --save-interval 1 (SIGKILL during a save)")
    if not seen["killed"] and seen["rc"] != 0:  # as every engine command: a crash is an error, 77 a decline
        verdict = "failed" if seen["rc"] == EXIT_UNSUPPORTED else "error"
        return [Part(name="kill_during_save", verdict=verdict,
                     message=f"the run exited {seen['rc']} before the gate saw a checkpoint being written: "
                             f"{seen['stderr_last']}")], None
    if not seen["killed"]:
        return [Part(name="kill_during_save", verdict="error",
                     message="the run finished before the gate saw a checkpoint being written; nothing was killed")], None
    where = f"killed after step {seen['at_step']} while {', '.join(seen['changed']) or 'the save dir'} changed"
    try:
        box.run("C2", "engine pretrain --resume (after the kill)",
                args=box.args("C", [*extra, "--save-interval", "1", "--resume"], log="C2"))
    except GateStop as stop:
        msg = f"{where}; the resume failed: {stop.message}"
        return [Part(name="kill_during_save", verdict="failed", message=msg)], Localization(what=msg)
    logged = _logged(box.log("C2"))
    if not logged or min(logged) <= 1:
        msg = f"{where}; the resume restarted at step {min(logged) if logged else '?'} instead of after a checkpoint"
        return [Part(name="kill_during_save", verdict="failed", message=msg)], Localization(what=msg)
    p, loc = _final(g, box, "C2", "C", "pretrain --resume (after the kill)", a_log, a_state, names, bitwise, min(logged),
                    "kill_during_save")
    p.message = f"{where}; resumed at step {min(logged)}: " + p.message
    return [p], loc


def _logged(path) -> list[int]:
    import json

    steps = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return steps
