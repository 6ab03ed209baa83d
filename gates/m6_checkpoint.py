"""M6 checkpoint: save, resume, bit-identical continuation; the HF export loads in `transformers` and
reproduces the reference's logits.

Case (preset): `options.steps` steps, four micro batches per step (an engine whose accumulation order,
data order or noise depends on its RNG then shows a lost RNG state as a bitwise difference). The LR
schedule is the run's drawn one (`tiny`) when it can be cut at steps // 2 (wsd with its decay in the
second half, or constant); a drawn cosine becomes wsd, whose cut `hf_export` needs.

Parts:
- `resume`: the engine's `checkpoint` probe (save after steps // 2, resume in a fresh process state,
  finish) must equal its own `steps` probe **bitwise**: per-step losses, grad norms, lrs and every
  final weight, whatever the policy. Localization: the first step that differs (at or after the
  resume point when only the resume is wrong) and the first final weight that differs.
- `hf_export`: `export-hf --checkpoint <checkpoint probe out>/ckpt --out HF` (the step-steps//2
  checkpoint); `AutoModelForCausalLM.from_pretrained(HF, trust_remote_code=False)` in the case dtype on
  the case device; its residual stream (`hidden_states` 0..L-1, the MiniCPM scales being folded) and
  logits on step 0's global batch are compared under the policy with the reference's `forward` at the
  engine's own weights after steps // 2 steps (its `steps` probe on the case cut to steps // 2 with the
  same lrs, which a deterministic engine ends where its checkpoint does). So the part sees the export's
  fold alone, not how two trainings drift apart (an AdamW step of a near-zero gradient that reverses moves
  one embedding element by a step: max_rel ~1e-4 in fp32 at the drawn shapes, at the fp32 bound). The
  tokenizer must load with AutoTokenizer and fit the vocabulary.

Verdict: the worse of the two parts (failed > error > unsupported > passed).
"""

from __future__ import annotations

import torch

from gates.case import Case, CaseShape, CaseSpec, ScheduleSpec, hf_param_shapes
from gates.context import GateRun, GateStop, localize, localize_training, part
from gates.report import GateReport, Localization, Part, worst
from gates.stacks.torch_ref.optim import lr_at

SERIES = ["losses", "grad_norms", "lrs"]
MICRO_BATCHES = 4


def schedule(shape: CaseShape, steps: int) -> ScheduleSpec:
    """The run's schedule in a form `truncated_spec` can cut at steps // 2 (default: the case format's)."""
    s = shape.schedule
    if s is None:
        return ScheduleSpec()
    if s.kind == "constant":
        return s
    decay = max(1, min(shape.decay_steps or 1, steps - steps // 2))
    return ScheduleSpec(kind="wsd", warmup_steps=s.warmup_steps, decay_steps=decay)


def run(g: GateRun) -> GateReport:
    steps = g.options.steps
    case = g.make_case(steps=steps, grad_accum=MICRO_BATCHES, schedule=schedule(g.shape, steps))
    if case.spec.steps < 2:
        raise GateStop("unsupported", "gate limit: M6 needs a case with at least 2 steps (checkpoint after steps // 2)")
    eng_s, _, _ = g.engine_probe("steps", case)
    g.check("steps", eng_s, case)
    eng_c, _, box = g.engine_probe("checkpoint", case, keep=True)
    g.check("checkpoint", eng_c, case)

    bitwise = g.policy.model_copy(update={"name": "bitwise", "rel": None, "max_rel": None})
    weights = [f"weight.{k}" for k in hf_param_shapes(case.spec.model)]
    s = g.compare_names(SERIES, eng_c, eng_s, case, bitwise, prefix="resume:")
    w = g.compare_names(weights, eng_c, eng_s, case, bitwise, prefix="resume:")
    resume = part("resume", s + w, "" if all(d.ok for d in s + w) else
                  f"checkpoint probe differs from steps probe (bitwise) in {sum(not d.ok for d in s + w)} values")
    resume_loc = localize_training(s, w, f"resume after step {case.spec.steps // 2} vs uninterrupted (bitwise): ")

    hf, hf_loc = hf_export(g, case, box)
    g.report.parts = [resume, hf]
    verdict = worst([resume.verdict, hf.verdict])
    if verdict == "passed":
        return g.finish("passed", "bit-identical resume; HF export reproduces the reference's logits")
    return g.finish(verdict, "; ".join(f"{p.name}: {p.verdict}" for p in g.report.parts), resume_loc or hf_loc)


def truncated_spec(spec: CaseSpec, k: int) -> CaseSpec | None:
    """`spec` cut to its first k steps with the same lr at every one of them, or None if no schedule
    the case format can express does that (a cosine decays toward the original end)."""
    want = [lr_at(t, spec.steps, spec.optimizer, spec.schedule) for t in range(1, k + 1)]
    for sched in (spec.schedule, ScheduleSpec(kind="constant", warmup_steps=spec.schedule.warmup_steps)):
        cand = spec.model_copy(update={"steps": k, "schedule": sched})
        if [lr_at(t, k, cand.optimizer, cand.schedule) for t in range(1, k + 1)] == want:
            return cand
    return None


def hf_export(g: GateRun, case: Case, box) -> tuple[Part, Localization | None]:
    spec, k = case.spec, case.spec.steps // 2
    hf_dir = box.root / "hf"
    try:
        g.run_engine(["export-hf", "--checkpoint", str(box.out / "ckpt"), "--out", str(hf_dir)], box, "engine export-hf")
    except GateStop as stop:
        return Part(name="hf_export", verdict=stop.verdict, message=stop.message), stop.localization
    try:
        model, problem = load_hf(hf_dir, spec)
    finally:
        if not g.options.keep_workdirs:
            box.remove()
    if problem:
        return Part(name="hf_export", verdict="failed", message=problem), Localization(what=f"HF export: {problem}")
    half = truncated_spec(spec, k)
    if half is None:
        return Part(name="hf_export", verdict="unsupported", message=f"the case's {spec.schedule.kind} schedule cannot be "
                    f"cut to {k} steps with the same lrs; use a wsd or constant schedule"), None
    first_k = g.write_case(half, {n: t[:k] for n, t in case.batches.items()}, case.weights, label=f"first {k} steps")
    try:
        trained, _, _ = g.engine_probe("steps", first_k, role=f"engine probe steps (first {k})")
        g.check("steps", trained, first_k)
    except GateStop as stop:
        return Part(name="hf_export", verdict=stop.verdict, message=stop.message), stop.localization
    weights = {n: trained[f"weight.{n}"] for n in case.weights}
    fwd = g.write_case(half.model_copy(update={"steps": 1}), {n: t[:1] for n, t in case.batches.items()}, weights,
                       label=f"forward at the engine's weights after {k} steps")
    ref = g.reference_probe("forward", fwd)
    ids = fwd.global_batch(0)[0].to(spec.device)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    L = spec.model.num_layers
    got = {f"hidden_states.{i}": out.hidden_states[i].float().cpu() for i in range(L)}
    got["logits"] = out.logits.float().cpu()
    diffs = g.compare_names(list(got), got, ref, fwd, prefix="hf_export:")
    p = part("hf_export", diffs)
    p.message = f"transformers {type(model).__name__}, step-{k} weights: " + p.message
    loc = localize(diffs, "HF export vs reference forward at step-%d weights: " % k)
    return p, loc


def load_hf(hf_dir, spec: CaseSpec):
    """(model, None) or (None, what is wrong). No remote code, ever."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=False, dtype=spec.torch_dtype)
    except Exception as e:  # noqa: BLE001 - any load failure is the export's fault
        return None, f"AutoModelForCausalLM.from_pretrained failed: {type(e).__name__}: {str(e)[:300]}"
    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        return None, f"AutoTokenizer.from_pretrained failed: {type(e).__name__}: {str(e)[:300]}"
    if len(tok) > spec.model.vocab_size:
        return None, f"tokenizer has {len(tok)} tokens, more than the model's vocab_size {spec.model.vocab_size}"
    if model.config.vocab_size != spec.model.vocab_size:
        return None, f"exported vocab_size {model.config.vocab_size} != {spec.model.vocab_size}"
    return model.to(spec.device).eval(), None
