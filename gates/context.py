"""What every gate does the same way: build its case, run the engine then the reference, check and
compare outputs, and fill the report. A gate module only says which probes, which case, and how to
localize.

Flow control: a helper that hits a verdict before the comparison (the engine declines, it crashes,
it breaks the contract) raises `GateStop`; the runner turns it, and `GateTimeout`, into the report.

Verdicts before the comparison: an engine that exits 77 on a command the gate runs has declined it:
`failed`. Only the gate's own limits give `unsupported` (the reference stack is missing or declines,
the hardware lacks GPUs), and the message names the limit.

Comparisons (`compare_names`): under the comparative policy (bf16, gates/policies.py) every reference
answer comes with its float32 twin's (the same probe on the same case in float32), and each tensor's
bounds are K x the bf16 reference's own error against that twin. Under the default float32 policy the
per-step grad norms are measured against the reference's float64-accumulated norm of its own gradients,
bounded by its own float32 norm's error (the float64-twin rule, gates/policies.py).
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from gates import case as case_mod
from gates.case import (DRAWN_PRESETS, Case, CaseError, CaseShape, CaseSpec, case_hash, draw_shape, load_case, make_spec,
                        option_shape)
from gates.checks import check_outputs, layer_of, layer_order
from gates.launch import (Deadline, Engine, GateTimeout, Proc, Sandbox, engine_argv, engine_env, reference_code_hash,
                          reference_env, run_process)
from gates.model_config import PRESETS
from gates.options import GateOptions
from gates.policies import (EXACT_TWINS, Diff, Policy, Scale, compare, compare_scaled, compare_series, compare_twin_series,
                            reference_scale, resolve_policy, scalar_scale, series_scale, twin_scale)
from gates.probe import EXIT_UNSUPPORTED, METRICS_FILE, TENSORS_FILE
from gates.report import Command, GateReport, Localization, Part, Verdict, now_iso


class GateStop(Exception):
    """A verdict reached before (or instead of) the comparison."""

    def __init__(self, verdict: Verdict, message: str, error_type: str | None = None,
                 localization: Localization | None = None):
        super().__init__(message)
        self.verdict, self.message, self.error_type, self.localization = verdict, message, error_type, localization


class GateRun:
    """One gate's run: options, deadline, the report being filled, temporary directories."""

    def __init__(self, gate: str, engine: Engine, options: GateOptions):
        self.gate, self.engine, self.options = gate, engine, options
        self.deadline = Deadline(options.timeout_s)
        self.t0 = time.monotonic()
        self.report = GateReport(gate=gate, verdict="error", engine=str(engine.root), engine_package=engine.package,
                                 reference=options.reference, started_at=now_iso())
        self.policy: Policy | None = None
        self._tmp: list[Path] = []
        self._shape_applied = False
        self._twins: dict[Path, Case] = {}
        self._weights_files: dict[int, tuple[dict[str, torch.Tensor], Path]] = {}  # id(case.weights) -> (them, file)

    # ----- cases -----------------------------------------------------------------------------
    def is_preset(self) -> bool:
        return self.options.case in PRESETS

    @functools.cached_property
    def shape(self) -> CaseShape:
        """This run's case shape: drawn from the seed for `tiny` (gates/case.py draw_shape), the options'
        values for other presets; an explicit `world_size` option overrides the draw."""
        o = self.options
        seed = o.seed if o.seed is not None else 0
        if o.case in DRAWN_PRESETS:
            shape = draw_shape(seed)
            return shape if o.world_size is None else shape.model_copy(update={"world_size": o.world_size})
        return option_shape(seed, o.seq_length, o.micro_batch_size, o.world_size)

    def preset_spec(self, **fields) -> CaseSpec:
        """A CaseSpec of the preset in this run's shape, with `fields` overriding (raises CaseError). A field
        given as None takes the shape's value (world_size, grad_accum, schedule), or the case default."""
        o, shape = self.options, self.shape
        base = dict(world_size=1, micro_batch_size=shape.micro_batch_size, seq_length=shape.seq_length,
                    dtype=o.case_dtype, device=o.device, seed=shape.seed)
        for k in [k for k, v in fields.items() if v is None]:
            value = getattr(shape, k, None)
            if value is None:
                del fields[k]
            else:
                fields[k] = value
        self._shape_applied = True
        return make_spec(shape.model(o.case), **(base | fields))

    def make_case(self, label: str = "case", **fields) -> Case:
        """A preset: a fresh random case in this run's shape with `fields` (seed from the options). A
        directory: a private copy of it (fields ignored). The first case made is the report's `case`; later
        ones are listed under `case.derived`."""
        o = self.options
        d = self.tmpdir("forge-case-")
        try:
            if self.is_preset():
                case_mod.new_case(d, self.preset_spec(**fields))
            else:
                src = Path(o.case)
                if not src.is_dir():
                    raise CaseError(f"--case {o.case!r} is neither a preset ({', '.join(PRESETS)}) nor a case directory")
                shutil.rmtree(d)
                shutil.copytree(src, d)
            case = load_case(d)
        except CaseError as e:
            raise GateStop("error", str(e), "case") from None
        return self.record_case(case, label)

    def record_case(self, case: Case, label: str = "case") -> Case:
        self._weights_files[id(case.weights)] = (case.weights, case.dir / "weights.safetensors")
        spec = case.spec
        info = {"label": label, "source": f"preset {self.options.case}" if self.is_preset() else str(Path(self.options.case).resolve()),
                "hash": case_hash(case.dir), "seed": spec.seed, "model": spec.model.name, "dtype": spec.dtype,
                "device": spec.device, "world_size": spec.world_size, "steps": spec.steps,
                "global_rows": spec.global_batch_rows, "micro_batch_size": spec.micro_batch_size,
                "grad_accum": spec.grad_accum, "seq_length": spec.seq_length, "num_layers": spec.model.num_layers,
                "vocab_size": spec.model.vocab_size, "tie_word_embeddings": spec.model.tie_word_embeddings,
                "schedule": spec.schedule.model_dump()}
        if not self.report.case:
            info["shape"] = self.shape.model_dump() | {"applied": self._shape_applied}
            self.report.case = info
            try:
                self.policy = resolve_policy(self.options.policy, spec.dtype, self.options.rel_bound, self.options.max_bound)
            except ValueError as e:
                raise GateStop("error", str(e), "policy") from None
            self.report.policy = self.policy.model_dump() | {"describe": self.policy.describe()}
        else:
            self.report.case.setdefault("derived", []).append(info)
        return case

    def write_case(self, spec, batches: dict[str, torch.Tensor] | None = None,
                   weights: dict[str, torch.Tensor] | None = None, label: str = "derived") -> Case:
        """Write a gate-made case (derived from another, or with corpus batches) and record it. `weights` that are
        a recorded case's own (`case.weights`, never changed in place) link that case's file, not a new copy."""
        d = self.tmpdir("forge-case-")
        known = self._weights_files.get(id(weights))
        if known is not None and known[0] is weights:
            case_mod.new_case(d, spec, batches=batches, weights_file=known[1])
        else:
            case_mod.new_case(d, spec, weights, batches=batches)
        try:
            return self.record_case(load_case(d), label)
        except CaseError as e:
            raise GateStop("error", str(e), "case") from None

    # ----- running stacks ----------------------------------------------------------------------
    def tmpdir(self, prefix: str) -> Path:
        d = Path(tempfile.mkdtemp(prefix=prefix))
        self._tmp.append(d)
        return d

    def sandbox(self, case_dir: Path | None, prefix: str = "forge-engine-") -> Sandbox:
        """A fresh sandbox, removed by `cleanup` (or earlier by the caller)."""
        box = Sandbox(case_dir, prefix)
        self._tmp.append(box.root)
        return box

    def _record(self, role: str, proc: Proc) -> None:
        self.report.commands.append(Command(role=role, argv=proc.argv, cwd=str(proc.cwd), env=proc.env_set, rc=proc.rc,
                                            time_s=round(proc.time_s, 3), timed_out=proc.timed_out))
        if proc.stderr.strip():
            self.report.artifacts[f"{role} stderr"] = proc.stderr
        if proc.timed_out:
            raise GateTimeout(f"{role} ran past the gate budget of {self.options.timeout_s:.0f}s")

    def run_engine(self, args: list[str], sandbox: Sandbox, role: str, nproc: int = 1) -> Proc:
        """Any engine command (probe, export-hf, bench) in `sandbox`; raises GateStop on exit 77 (the engine
        declined a command of the gate: `failed`) or a crash."""
        from gates.sandbox import run_engine_command  # here: gates.sandbox imports GateStop from this module

        proc = run_engine_command(self, engine_argv(self.engine, args, nproc), sandbox, engine_env(self.engine), role)
        self._record(role, proc)
        if proc.rc == EXIT_UNSUPPORTED or (proc.rc != 0 and nproc > 1 and _ranks_declined(proc.stderr)):
            command = " ".join(args[:2]) if args[:1] == ["probe"] else args[0]
            what = f"the engine declined `{command}` (exit {EXIT_UNSUPPORTED})"
            raise GateStop("failed", what, localization=Localization(what=f"{role}: {what}"))
        if proc.rc != 0:
            self.report.artifacts["stderr_tail"] = proc.stderr
            rank = _failed_rank(proc.stderr + proc.stdout) if nproc > 1 else None
            where = f" (rank {rank})" if rank is not None else ""
            raise GateStop("error", f"{role} exited {proc.rc}{where}: {last_line(proc.stderr)}", "engine_crash",
                           Localization(what=f"{role} crashed{where}", rank=rank) if rank is not None else None)
        return proc

    def engine_probe(self, probe: str, case: Case, nproc: int = 1, role: str | None = None,
                     keep: bool = False) -> tuple[dict[str, torch.Tensor], dict, Sandbox]:
        """Run the engine's probe on `case`, read-only in its sandbox; read only the contract's two files.
        The sandbox is removed unless `keep` (the caller removes it then)."""
        role = role or f"engine probe {probe}"
        sandbox = self.sandbox(case.dir)
        args = ["probe", probe, "--case", str(sandbox.case), "--out", str(sandbox.out)]
        if self.options.tp > 1:  # each of the nproc data-parallel ranks is tp processes
            args, nproc = args + ["--tp", str(self.options.tp)], nproc * self.options.tp
        try:
            self.run_engine(args, sandbox, role, nproc)
            tensors, metrics = self._read(sandbox.out, role, engine=True)
            self.report.engine_metrics[role] = _bounded(metrics)
        finally:
            if not keep and not self.options.keep_workdirs:
                sandbox.remove()
        return tensors, metrics, sandbox

    def reference_probe(self, probe: str, case: Case, twin: bool = True, stack: str | None = None) -> dict[str, torch.Tensor]:
        """The reference's answer; run after the engine's, read, and deleted at once. Under the comparative
        policy (and `twin`) a `RefTensors` that also holds the answer on the case's float32 twin. `stack`:
        a gates.stacks.STACKS name other than the options' reference (M5's speed check)."""
        tensors = self._reference_answer(probe, case, stack)
        if not (twin and self.policy is not None and self.policy.comparative and case.spec.dtype != "float32"):
            return tensors
        return RefTensors(tensors, self._reference_answer(probe, self.float32_twin(case), stack))

    def float32_twin(self, case: Case) -> Case:
        """`case` in float32: same model, weights, batches and schedule (the comparative rule's yardstick)."""
        if case.dir not in self._twins:
            spec = case.spec.model_copy(update={"dtype": "float32"})
            label = f"float32 twin of {case.dir.name}"
            self._twins[case.dir] = self.write_case(spec, batches=case.batches, weights=case.weights, label=label)
        return self._twins[case.dir]

    def _reference_answer(self, probe: str, case: Case, stack: str | None = None) -> dict[str, torch.Tensor]:
        from gates.stacks import STACKS

        ref = stack or self.options.reference
        if ref not in STACKS:
            raise GateStop("unsupported", f"gate limit: the reference stack {ref!r} is not available here "
                           f"(gates.stacks.STACKS has {', '.join(STACKS)})")
        cache = self._cache_dir(ref, probe, case)
        if cache is not None and (cache / TENSORS_FILE).is_file():
            self.report.artifacts[f"reference {probe}"] = f"from the reference cache {cache}"
            return self._read(cache, f"reference probe {probe}", engine=False)[0]
        # The reference (the workspace's own code) reads the case in place: an 8B-shaped case is 10 GB to copy.
        sandbox = self.sandbox(None, prefix="forge-ref-")
        try:
            argv = [*STACKS[ref], "probe", probe, "--case", str(case.dir), "--out", str(sandbox.out)]
            proc = run_process(argv, sandbox.root, reference_env(), self.deadline)
            self._record(f"reference probe {probe}", proc)
            if proc.rc == EXIT_UNSUPPORTED:
                raise GateStop("unsupported", f"gate limit: the reference {ref!r} declined probe {probe!r} on this case "
                               f"(exit {EXIT_UNSUPPORTED})")
            if proc.rc != 0:
                self.report.artifacts["stderr_tail"] = proc.stderr
                raise GateStop("error", f"reference {ref!r} probe {probe} exited {proc.rc}: {last_line(proc.stderr)}",
                               "reference_crash")
            tensors = self._read(sandbox.out, f"reference probe {probe}", engine=False)[0]
            if cache is not None:
                _store(cache, sandbox.out)
        finally:
            if not self.options.keep_workdirs:
                sandbox.remove()
        bad = check_outputs(probe, tensors, case, lr_positive=False)
        if bad is not None:
            raise GateStop("error", f"the reference's own output breaks the contract: {bad.what}", "reference_crash")
        return tensors

    def _cache_dir(self, ref: str, probe: str, case: Case) -> Path | None:
        if self.options.reference_cache is None:
            return None
        return Path(self.options.reference_cache) / f"{ref}-{probe}-{case_hash(case.dir)[:24]}-{reference_code_hash()[:12]}"

    def _read(self, out: Path, role: str, engine: bool) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors.torch import load_file

        verdict: Verdict = "failed" if engine else "error"
        etype = None if engine else "reference_crash"
        for f in (TENSORS_FILE, METRICS_FILE):
            if not (out / f).is_file():
                raise GateStop(verdict, f"{role} exited 0 but wrote no {f} (the probe contract names it)", etype,
                               Localization(what=f"{role}: {f} missing") if engine else None)
        try:
            tensors = load_file(str(out / TENSORS_FILE))
            metrics = json.loads((out / METRICS_FILE).read_text())
        except Exception as e:  # noqa: BLE001 - any unreadable output is the stack's fault
            raise GateStop(verdict, f"{role}: unreadable output: {e}", etype) from None
        return tensors, metrics

    def check(self, probe: str, tensors: dict[str, torch.Tensor], case: Case) -> None:
        """Contract checks on engine outputs; GateStop(failed) at the first problem."""
        lr_positive = case.spec.optimizer.lr > 0
        bad = check_outputs(probe, tensors, case, lr_positive)
        if bad is not None:
            raise GateStop("failed", f"engine {probe} output breaks the contract: {bad.what}", localization=bad)

    # ----- comparing -----------------------------------------------------------------------------
    def compare_names(self, names: list[str], eng: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                      case: Case, policy: Policy | None = None, prefix: str = "",
                      step_cap: float | None = None, scale: "RefTensors | None" = None) -> list[Diff]:
        """Compare `names` in layer order; per-step series element by element. Adds to the report.
        `step_cap`: for weights after AdamW steps (policies.adamw_step_cap), applied to non-series names.
        Comparative policy: `ref` is a reference answer with its float32 twin (`reference_probe`), and the
        engine is measured against the twin; or `scale` is such an answer, setting the bounds while the
        engine is measured against `ref` itself (e.g. the engine at DP=1)."""
        policy = policy or self.policy
        if policy.comparative:
            diffs = self._compare_scaled(names, eng, ref, case, policy, prefix, step_cap, scale)
        else:
            diffs = []
            for n in layer_order(names, case):
                if n in SERIES_NAMES:
                    twin = self._twin_series(n, eng, ref, policy, prefix, scale)
                    diffs += twin if twin is not None else compare_series(prefix + n, eng[n], ref[n], policy)
                else:
                    diffs.append(compare(prefix + n, eng[n], ref[n], policy, step_cap))
        self.report.tensors += diffs
        return diffs

    def _twin_series(self, n: str, eng: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], policy: Policy,
                     prefix: str, scale: dict[str, torch.Tensor] | None) -> list[Diff] | None:
        """Series `n` under the float64-twin rule (gates/policies.py), or None where it does not apply. The
        reference answer (`scale` when given, else `ref`) sets the bound from its own error against its float64
        twin; the engine is measured against that twin, or against `ref` when `scale` is given (the engine's
        other run)."""
        exact = EXACT_TWINS.get(n)
        if exact is None or not policy.twin_rule:
            return None
        base = scale if scale is not None else ref
        if exact not in base:
            self.report.artifacts[f"{prefix}{n} bounds"] = (f"the policy's fixed bounds: the reference's answer has no "
                                                            f"{exact} (its float64 twin) to set them by")
            return None
        try:
            s = twin_scale(base[n], base[exact])
        except ValueError as e:
            raise GateStop("error", f"{prefix}{n}: {e}", "reference_crash") from None
        target, against = (ref[n], "the engine's other run") if scale is not None else (base[exact], "the reference's float64 twin")
        return compare_twin_series(prefix + n, eng[n], target, s, policy, against)

    def _compare_scaled(self, names: list[str], eng: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                        case: Case, policy: Policy, prefix: str, step_cap: float | None,
                        scale: "RefTensors | None") -> list[Diff]:
        """The comparative rule over `names` (see compare_names)."""
        base = scale if scale is not None else ref
        if not isinstance(base, RefTensors):
            raise TypeError("the comparative policy needs a reference answer with its float32 twin (reference_probe)")
        target = ref if scale is not None else base.exact
        diffs: list[Diff] = []
        for n in layer_order(names, case):
            if n in SERIES_NAMES:
                diffs += _series_scaled(prefix + n, eng[n], target[n], series_scale(base[n], base.exact[n], policy), policy)
            else:
                s = scalar_scale(reference_scale(base[n], base.exact[n]), base[n].numel(), policy)
                diffs.append(compare_scaled(prefix + n, eng[n], target[n], s, policy, step_cap))
        return diffs

    def finish(self, verdict: Verdict, message: str = "", localization: Localization | None = None,
               error_type: str | None = None) -> GateReport:
        r = self.report
        r.verdict, r.message, r.localization, r.error_type = verdict, message, localization, error_type
        r.time_s = round(time.monotonic() - self.t0, 3)
        return r

    def cleanup(self) -> None:
        if self.options.keep_workdirs:
            self.report.artifacts["workdirs"] = " ".join(map(str, self._tmp))
            return
        for d in self._tmp:
            shutil.rmtree(d, ignore_errors=True)


SERIES_NAMES = ("losses", "grad_norms", "lrs")


def _series_scaled(name: str, a: torch.Tensor, target: torch.Tensor, scale: Scale, policy: Policy) -> list[Diff]:
    """Per-step scalars under the comparative rule: one Diff per step, named `name[t]`, sharing one scale."""
    if a.shape != target.shape:
        return [compare_scaled(name, a, target, scale, policy)]
    return [compare_scaled(f"{name}[{t}]", a[t], target[t], scale, policy) for t in range(target.shape[0])]


class RefTensors(dict):
    """A reference answer (name -> tensor) with `exact`: the same probe's answer on the float32 twin."""

    def __init__(self, tensors: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]):
        super().__init__(tensors)
        self.exact = exact


def localize(diffs: list[Diff], what_prefix: str = "") -> Localization | None:
    """The first failing diff (the list is in layer / step order), with the worst one named too."""
    bad = [d for d in diffs if not d.ok]
    if not bad:
        return None
    first = bad[0]
    worst = max(bad, key=lambda d: d.rel if d.rel == d.rel else float("inf"))
    step = _step_of(first.name)
    base = first.name.split("[")[0].split(":", 1)[-1]
    layer = layer_of(base)
    where = f"layer {layer}" if layer is not None and layer >= 0 else ("embedding" if layer == -1 else "")
    what = f"{what_prefix}{first.name}{' (' + where + ')' if where else ''}: {first.figures()}; {first.note}"
    return Localization(what=what, layer=layer, tensor=base, step=step, rel=first.rel, max_abs=first.max_abs,
                        max_rel=first.max_rel, worst=None if worst is first else f"{worst.name}: {worst.figures()}")


def verdict_of(diffs: list[Diff]) -> Verdict:
    return "passed" if all(d.ok for d in diffs) else "failed"


def part(name: str, diffs: list[Diff], message: str = "") -> Part:
    bad = sum(not d.ok for d in diffs)
    msg = message or (f"{len(diffs)} compared, all within bounds" if not bad else f"{bad} of {len(diffs)} out of bounds")
    return Part(name=name, verdict=verdict_of(diffs), message=msg)


def _store(cache: Path, out: Path) -> None:
    """Atomic: the entry appears complete or not at all (concurrent gate runs may share a cache)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache.parent))
    for f in (TENSORS_FILE, METRICS_FILE):
        shutil.copy(out / f, tmp / f)
    try:
        tmp.rename(cache)
    except OSError:  # another run stored the same entry first
        shutil.rmtree(tmp, ignore_errors=True)


def _step_of(name: str) -> int | None:
    if name.endswith("]") and "[" in name:
        return int(name.rsplit("[", 1)[1][:-1])
    return None


def _bounded(metrics: object, limit: int = 8192) -> dict:
    """An engine's metrics.json for the report: a dict, kept whole up to `limit` characters of JSON (the engine
    writes it, so its size is not ours to trust); otherwise a note saying what was dropped."""
    if not isinstance(metrics, dict):
        return {"note": f"metrics.json is a {type(metrics).__name__}, not an object"}
    text = json.dumps(metrics, default=str)
    return metrics if len(text) <= limit else {"note": f"metrics.json left out: {len(text)} characters > {limit}"}


def last_line(text: str) -> str:
    """A command's stderr as one line for a verdict: its last non-blank line."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no stderr)"


def _failed_rank(text: str) -> int | None:
    """The root-cause rank of torchrun's failure summary (`Root Cause ... rank : 1 (local_rank: 1)`)."""
    import re

    text = text[text.find("Root Cause"):] if "Root Cause" in text else text
    m = re.search(r"rank\s*:\s*(\d+)\s*\(local_rank", text)
    return int(m.group(1)) if m else None


def _ranks_declined(text: str) -> bool:
    """torchrun exits 1 when workers fail. The engine declined when some worker exited 77 and every other
    failed worker was only killed by a signal (torchrun stops the rest after the first failure)."""
    import re

    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", text)]
    return EXIT_UNSUPPORTED in codes and all(c == EXIT_UNSUPPORTED or c < 0 for c in codes)


def localize_training(series: list[Diff], weights: list[Diff], prefix: str = "") -> Localization | None:
    """Steps-probe localization: the first step whose loss / grad norm / lr diverges, and the first final
    weight (layer order) out of bounds; one line naming both."""
    s_loc, w_loc = localize(series), localize(weights)
    if s_loc is None and w_loc is None:
        return None
    if s_loc is None:
        w_loc.what = f"{prefix}per-step losses, grad norms and lrs within bounds; final {w_loc.what}"
        return w_loc
    first_step = min(_step_of(d.name) for d in series if not d.ok)
    at_step = [d for d in series if not d.ok and _step_of(d.name) == first_step]
    s_loc = localize(at_step)
    what = f"{prefix}step {first_step}: {s_loc.what}"
    if w_loc is not None:
        what += f" | final {w_loc.what}"
    return Localization(what=what, step=first_step, tensor=w_loc.tensor if w_loc else s_loc.tensor,
                        layer=w_loc.layer if w_loc else None, rel=s_loc.rel, max_abs=s_loc.max_abs,
                        max_rel=s_loc.max_rel, worst=w_loc.worst if w_loc else s_loc.worst)
