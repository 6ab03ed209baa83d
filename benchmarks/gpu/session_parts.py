"""The GPU session's parts: each a function from its typed options to the commands it runs (a `Plan`).

Every part writes into $OUT/<part>/ (its log.txt: all steps' output) and is bundled into $OUT/<part>.tgz.
The helper scripts under benchmarks/gpu/ that read environment knobs get them from here, set explicitly.
Stdlib only (argparse): the GPU image runs this before any carried wheel is known to import.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchmarks.gpu.session_steps import ENGINE, Context, Plan, Step, step

PlanFn = Callable[[Context, argparse.Namespace], Plan]
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # the device tool returns only such file names
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

PY = "python3"
BENCH = (PY, "-m", "train_engine_0_5b", "bench")
PYTEST = (PY, "-m", "pytest", "-q", "-p", "no:cacheprovider")
GRAPH_CHECK = ("bash", "benchmarks/gpu/graph_check.sh")
T = f"{ENGINE}/tests"  # the engine's tests
TRITON_ALL = ("rms_norm=triton_fused,add_rms_norm=triton_fused,rope=triton_fused,swiglu=triton_fused,"
              "cross_entropy=triton_fused,adamw=triton_fused,gemm=concat")


@dataclass(frozen=True)
class Opt:
    """One typed option: add_argument's arguments. forward: passed on to the part's script as `flag value`."""

    flags: tuple[str, ...]
    kwargs: dict[str, Any]
    forward: bool = False

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flags[0].lstrip("-").replace("-", "_")


def opt(*flags: str, **kwargs: Any) -> Opt:
    return Opt(flags, kwargs)


def fwd(flag: str, type: type | None = str, help: str = "", script: str = "the script", **extra: Any) -> Opt:
    """An option of the part's script, passed on only when given (else the script's own default)."""
    kw: dict[str, Any] = {"default": None, "help": f"{help} (passed to {script}; default: its own)".lstrip(), **extra}
    if type is None:
        kw.update(action="store_true", default=False)
    else:
        kw["type"] = type
        if "choices" not in extra:
            kw["metavar"] = flag.lstrip("-").upper().replace("-", "_")
    return Opt((flag,), kw, forward=True)


@dataclass(frozen=True)
class Part:
    name: str
    help: str
    opts: tuple[Opt, ...]
    plan: PlanFn
    extra: Callable[[argparse.ArgumentParser], None] | None = None

    def parser(self) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog=f"session.sh {self.name}", description=self.help, allow_abbrev=False,
                                    epilog="End this part's options with `--` before the next part.")
        for o in self.opts:
            p.add_argument(*o.flags, **o.kwargs)
        if self.extra:
            self.extra(p)
        return p

    def forwarded(self, a: argparse.Namespace) -> list[str]:
        """The script options given on the command line, as argv words."""
        out: list[str] = []
        for o in self.opts:
            v = getattr(a, o.dest)
            if not o.forward or v is None or v is False:
                continue
            out += [o.flags[0]] if v is True else [o.flags[0], str(v)]
        return out


PARTS: dict[str, Part] = {}


def part(name: str, help: str, *opts: Opt, extra: Callable[[argparse.ArgumentParser], None] | None = None
         ) -> Callable[[PlanFn], PlanFn]:
    def register(fn: PlanFn) -> PlanFn:
        PARTS[name] = Part(name, help, opts, fn, extra)
        return fn
    return register


def timeout(default: int, what: str = "the part's main command") -> Opt:
    return opt("--timeout-s", type=int, default=default, help=f"seconds before {what} is killed (default {default})")


MBS = opt("--micro-batch-size", type=int, default=8, help="the bench's micro batch (default 8)")
BENCH_ARGS = opt("--bench-arg", action="append", default=[], metavar="ARG", dest="bench_args",
                 help="one more word for the engine's bench command line, repeatable "
                      "(a value starting with '-' needs the = form: --bench-arg=--no-cuda-graph)")
GRAPH_VARIANTS = opt("--variants", nargs="+", default=None, metavar="VARIANT",
                     help="graph_check.sh's op variants (test ids of test_graphed_run_matches_the_eager_run)")


def with_env(env: dict[str, str], steps: list[Step]) -> Plan:
    """The part's environment on each of its steps (a step's own overrides win)."""
    return Plan(tuple(Step(s.argv, s.timeout_s, {**env, **s.env}, s.stderr_file, s.note, s.json_summary)
                      for s in steps))


def _graph_check_env(ctx: Context, part: str, variants: list[str] | str | None, **knobs: str) -> dict[str, str]:
    env = {"OUT": str(ctx.part_dir(part)), **knobs}
    if variants:
        env["VARIANTS"] = variants if isinstance(variants, str) else " ".join(variants)
    return env


# ---- the loop's gates ---------------------------------------------------------------------------------------

E8 = "exports/train_engine_8b"
ENGINES = (ENGINE, E8)
BENCH8 = (PY, "-m", "train_engine_8b", "bench", "--seq-length", "4096", "--steps", "10", "--warmup", "3")
M8L, M8L_TP2 = "benchmarks/models/minicpm4-8b-8l.toml", "benchmarks/models/minicpm4-8b-8l-tp2-rank.toml"
BENCH8_MODELS = {"minicpm4-8b-8l": M8L}  # the 8B gate presets whose model `bench` can take (m5's bench beside it)
ENGINE_OPT = opt("--engine", default=ENGINE, choices=ENGINES, help=f"the engine the gates check (default {ENGINE})")
CASE_OPT = fwd("--case", str, "the gates' model preset", "gate_stage.py")


@part("stage", "gates on one GPU as the loop runs them (gate_stage.py)",
      opt("--gates", default="m1,m2,m3,m7", help="comma-separated gate names (default m1,m2,m3,m7); '/' separates "
                                                 "lanes run at once (m1,m2,m3/m6,m7/m8)"),
      opt("--seq-length", type=int, default=2048, help="the gates' case sequence length (default 2048)"),
      opt("--gate-timeout-s", type=int, default=300, help="each gate's timeout (default 300)"),
      timeout(540, "the whole stage (at least --gate-timeout-s + 30)"),
      fwd("--m5-parts", str, "M5's parts (loss when M5 shares a stage with lanes)", "gate_stage.py",
          choices=("both", "loss", "mfu")),
      fwd("--long-train-steps", int, "M5 loss part's steps", "gate_stage.py"),
      fwd("--reference", str, "the reference stack", "gate_stage.py", choices=("torch", "megatron")),
      ENGINE_OPT, CASE_OPT)
def stage(ctx: Context, a: argparse.Namespace) -> Plan:
    d = ctx.part_dir("stage")
    return Plan((step(PY, "-m", "benchmarks.gpu.gate_stage", "--engine", a.engine, "--gates", a.gates, "--out", d,
                      "--seq-length", a.seq_length, "--timeout", a.gate_timeout_s, *ctx.sandbox_args(),
                      *PARTS["stage"].forwarded(a), timeout_s=a.timeout_s),))


@part("m5", "the engine's bench (the 0.5B's at micro batch 8; the 8B's at the speed part's micro batch and case), then "
      "M5 (loss part and pretrain at its defaults) on the gate's clock",
      opt("--speed-steps", type=int, default=10, help="M5 speed part's warm-run steps and fewest timed steps (default 10)"),
      opt("--speed-global-batch-size", type=int, default=64, help="M5 speed part's global batch (default 64)"),
      opt("--long-train-steps", type=int, default=20, help="M5 loss part's steps (default 20)"),
      opt("--gate-timeout-s", type=int, default=420, help="M5's own timeout (default 420)"),
      timeout(450, "gate_stage.py"),
      opt("--no-bench", action="store_true", help="skip the engine's bench before the gate (a call's 600 s cap)"),
      fwd("--m5-parts", str, "which parts of M5 run", "gate_stage.py", choices=("both", "loss", "mfu")),
      fwd("--mfu-threshold", float, "M5's MFU bar", "gate_stage.py"),
      fwd("--speed-seq-length", int, "M5 speed part's sequence length", "gate_stage.py"),
      fwd("--speed-target-timed-s", float, "M5 speed part's timed window (the gates' default: 20 s on a GPU)",
          "gate_stage.py"),
      fwd("--seed", int, "the case's seed", "gate_stage.py"),
      opt("--speed-micro-batch-size", type=int, default=8, help="M5 speed part's micro batch (default 8)"),
      ENGINE_OPT, CASE_OPT)
def m5(ctx: Context, a: argparse.Namespace) -> Plan:
    d, mbs = ctx.part_dir("m5"), a.speed_micro_batch_size
    if a.no_bench:
        bench = []
    elif a.engine == E8:
        bench = [step(*BENCH8, "--micro-batch-size", mbs, "--model", BENCH8_MODELS[a.case], "--json",
                      d / f"bench_mb{mbs}.json", timeout_s=240, note="[m5] bench exit {rc}")]
    else:
        bench = [step(*BENCH, "--seq-length", 4096, "--micro-batch-size", 8, "--steps", 10, "--json", d / "bench_mb8.json",
                      timeout_s=150, note="[m5] bench exit {rc}")]
    return with_env(ctx.engine_pythonpath(ctx.root / E8 / "src" if a.engine == E8 else None), [
        *bench,
        step(PY, "-m", "benchmarks.gpu.gate_stage", "--engine", a.engine, "--gates", "m5", "--out", d,
             "--speed-steps", a.speed_steps, "--speed-global-batch-size", a.speed_global_batch_size,
             "--speed-micro-batch-size", a.speed_micro_batch_size, "--long-train-steps", a.long_train_steps,
             "--timeout", a.gate_timeout_s,
             *ctx.sandbox_args(), *PARTS["m5"].forwarded(a), timeout_s=a.timeout_s)])


@part("gates", "stage-1 gates M1-M3 of the export and the calibration engine in bf16 (gates_0.5b.sh)",
      timeout(300, "gates_0.5b.sh"),
      opt("--skip-base", action="store_true", help="the export alone, without the red-team base engine"))
def gates(ctx: Context, a: argparse.Namespace) -> Plan:
    env = {"OUT": str(ctx.part_dir("gates"))} | ({"SKIP_BASE": "1"} if a.skip_base else {})
    return Plan((step("bash", "benchmarks/gpu/gates_0.5b.sh", env=env, timeout_s=a.timeout_s),))


# ---- side by side -------------------------------------------------------------------------------------------

SCRIPT_MARGIN_S = 30  # compare_0.5b.sh keeps to its BUDGET_S; the kill after it only stops a hung script


@part("compare", "every stack side by side at seq 4096 (compare_0.5b.sh's compare part)",
      opt("--budget-s", type=int, default=300, help="compare_0.5b.sh's budget (default 300)"),
      opt("--stacks", default=None, help="comma-separated stacks in table order (default: compare_0.5b.sh's; "
                                         "engine:train_engine_8b for the 8B, gate-timed)"),
      opt("--model", default=None, help="model preset (default minicpm4-0.5b; minicpm4-8b-8l: the 8B's anchors)"),
      opt("--micro-batch-size", type=int, default=None, help="every stack's micro batch (default 8)"),
      opt("--seq-length", type=int, default=None, help="tokens per row (default 4096)"))
def compare(ctx: Context, a: argparse.Namespace) -> Plan:
    env = {"OUT": str(ctx.part_dir("compare")), "PART": "compare", "BUDGET_S": str(a.budget_s)}
    env |= {"STACKS": a.stacks} if a.stacks else {}
    env |= {k: str(v) for k, v in (("MODEL", a.model), ("MBS", a.micro_batch_size), ("SEQ", a.seq_length)) if v}
    return Plan((step("bash", "benchmarks/gpu/compare_0.5b.sh", env=env, timeout_s=a.budget_s + SCRIPT_MARGIN_S),))


@part("agreement", "torch vs megatron stacks: bf16 probes and the fp32 steps probe (compare_0.5b.sh's agreement part)",
      opt("--budget-s", type=int, default=330, help="compare_0.5b.sh's budget (default 330)"))
def agreement(ctx: Context, a: argparse.Namespace) -> Plan:
    env = {"OUT": str(ctx.part_dir("agreement")), "PART": "agreement", "BUDGET_S": str(a.budget_s)}
    return Plan((step("bash", "benchmarks/gpu/compare_0.5b.sh", env=env, timeout_s=a.budget_s + SCRIPT_MARGIN_S),))


# ---- the engine ---------------------------------------------------------------------------------------------

@part("kernels", "the engine's kernel table (scripts/gpu_kernels.py, 220 s budget)")
def kernels(ctx: Context, a: argparse.Namespace) -> Plan:
    return Plan((step(PY, f"{ENGINE}/scripts/gpu_kernels.py", "--budget", 220, "--out", ctx.part_dir("kernels"),
                      timeout_s=260),))


@part("engine", "the engine's GPU check: its test suite, bench, pretrain at its defaults, HF export (scripts/gpu_check.sh)",
      opt("--steps", type=int, default=50, help="pretrain steps (default 50: compiling takes 75 s of them)"),
      opt("--no-tests", action="store_true", help="skip its GPU test tier (about 4 minutes)"),
      timeout(570, "gpu_check.sh"))
def engine(ctx: Context, a: argparse.Namespace) -> Plan:
    env = {"OUT": str(ctx.part_dir("engine")), "STEPS": str(a.steps), "PYTEST": "0" if a.no_tests else "1"}
    return Plan((step("bash", f"{ENGINE}/scripts/gpu_check.sh", env=env, timeout_s=a.timeout_s),))


@part("variants", "engine bench variants beyond its default: eager Triton ops, eager default, compiled at "
      "micro batch 12")
def variants(ctx: Context, a: argparse.Namespace) -> Plan:
    d, e = ctx.part_dir("variants"), (*BENCH, "--seq-length", "4096", "--steps", "8", "--warmup", "3")
    return with_env(ctx.engine_pythonpath(), [
        step(*e, "--micro-batch-size", 8, "--no-compile", "--ops", TRITON_ALL, "--json", d / "eager_triton_mb8.json",
             timeout_s=150),
        step(*e, "--micro-batch-size", 8, "--no-compile", "--json", d / "eager_default_mb8.json", timeout_s=150),
        step(*e, "--micro-batch-size", 12, "--compile", "--json", d / "compile_mb12.json", timeout_s=200)])


def _compiled_bench() -> tuple[str, ...]:
    return (*BENCH, "--seq-length", "4096", "--steps", "8", "--warmup", "3", "--micro-batch-size", "8", "--compile")


@part("attention", "FA4 op tests on the real kernel, the attention table, the compiled step with flash4 and with SDPA",
      BENCH_ARGS)
def attention(ctx: Context, a: argparse.Namespace) -> Plan:
    d, e, x = ctx.part_dir("attention"), _compiled_bench(), a.bench_args
    return with_env(ctx.engine_pythonpath(), [
        step(*PYTEST, f"{T}/ops/test_attention_flash4.py", f"{T}/ops/test_attention_sdpa.py", timeout_s=240),
        step(PY, f"{ENGINE}/scripts/gpu_attention.py", "--out", d, timeout_s=150),
        step(*e, "--ops", "attention=flash4", *x, "--json", d / "compile_flash4_mb8.json", timeout_s=200),
        step(*e, "--ops", "attention=sdpa", *x, "--json", d / "compile_sdpa_mb8.json", timeout_s=200)])


@part("mlp", "mlp=quack_gated: its tests on the real kernel, the compiled step with it and unfused, the MLP table",
      BENCH_ARGS, opt("--table-timeout-s", type=int, default=150, help="gpu_mlp.py's timeout (default 150)"))
def mlp(ctx: Context, a: argparse.Namespace) -> Plan:
    d, e, x = ctx.part_dir("mlp"), _compiled_bench(), a.bench_args
    return with_env(ctx.engine_pythonpath(), [
        step(*PYTEST, f"{T}/ops/test_mlp_quack.py", f"{T}/ops/test_dswiglu_triton.py",
             f"{T}/core_train_engine_0_5b/test_trainer_direct_grads.py", f"{T}/ops/test_adamw_triton.py", timeout_s=240),
        step(*e, "--ops", "mlp=quack_gated", *x, "--json", d / "compile_quack_gated_mb8.json", timeout_s=200),
        step(*e, "--ops", "mlp=unfused", *x, "--json", d / "compile_unfused_mb8.json", timeout_s=200),
        step(PY, f"{ENGINE}/scripts/gpu_mlp.py", "--out", d, timeout_s=a.table_timeout_s)])




# bench8b's runs: name -> (model TOML, bench --ops, more bench options); `optable` only when named
BENCH8_RUNS = {"default": (M8L, "", ()), "sdpa": (M8L, "attention=sdpa", ()), "quack_mlp": (M8L, "mlp=quack_dgated", ()),
               "tp2_rank": (M8L_TP2, "", ()), "optable": (M8L, "", ("--op-table",))}
BENCH8_DEFAULT_RUNS = [name for name in BENCH8_RUNS if name != "optable"]


@part("bench8b", "the 8B's graph tests, then its bench at 8 layers, seq 4096: the default ops, SDPA, the quack "
      "MLP, and one rank's shapes of TP=2 (benchmarks/models/)",
      opt("--micro-batch-size", type=int, default=2, help="the bench's micro batch (default 2, the anchors')"),
      opt("--runs", nargs="+", choices=list(BENCH8_RUNS), default=BENCH8_DEFAULT_RUNS, metavar="RUN",
          help=f"which benches, in order (default {', '.join(BENCH8_DEFAULT_RUNS)}; optable: the default ops with "
               "--op-table, each registry op alone and the profiler's kernel breakdown); ~100 s each"),
      opt("--no-tests", action="store_true", help="skip the graph tests"))
def bench8b(ctx: Context, a: argparse.Namespace) -> Plan:
    d, m = ctx.part_dir("bench8b"), a.micro_batch_size
    steps = [] if a.no_tests else [step(*PYTEST, f"{E8}/tests/test_8b_cuda_graph.py", timeout_s=240)]
    for name in a.runs:
        model, ops, more = BENCH8_RUNS[name]
        out = d / f"{name}_8l_mb{m}.json"
        steps.append(step(*BENCH8, "--micro-batch-size", m, "--model", model, *(("--ops", ops) if ops else ()),
                          *more, "--json", out, timeout_s=300 if more else 240, json_summary=out))
    return with_env(ctx.engine_pythonpath(ctx.root / E8 / "src"), steps)


@part("optable", "the default compiled step with the per-op table and the profiler breakdown", MBS, BENCH_ARGS)
def optable(ctx: Context, a: argparse.Namespace) -> Plan:
    d, m = ctx.part_dir("optable"), a.micro_batch_size
    return with_env(ctx.engine_pythonpath(), [
        step(*BENCH, "--seq-length", 4096, "--steps", 8, "--warmup", 3, "--micro-batch-size", m, "--compile",
             "--op-table", *a.bench_args, "--json", d / f"optable_mb{m}.json", timeout_s=400)])


@part("trace", "the default compiled step's op table plus its ordered kernel timeline (step_trace.py)", MBS, BENCH_ARGS)
def trace(ctx: Context, a: argparse.Namespace) -> Plan:
    d, m = ctx.part_dir("trace"), a.micro_batch_size
    return with_env(ctx.engine_pythonpath(), [
        step(PY, "benchmarks/gpu/step_trace.py", "--trace", d / "trace.json.gz", "--seq-length", 4096, "--steps", 8,
             "--warmup", 3, "--micro-batch-size", m, "--compile", "--op-table", *a.bench_args,
             "--json", d / f"optable_mb{m}.json", timeout_s=300)])


# ---- CUDA graphs --------------------------------------------------------------------------------------------

@part("graph", "--cuda-graph: graph_check.sh (its GPU test per op variant, the graphed step), then the step without it",
      MBS, BENCH_ARGS, GRAPH_VARIANTS)
def graph(ctx: Context, a: argparse.Namespace) -> Plan:
    d, m = ctx.part_dir("graph"), a.micro_batch_size
    return with_env(ctx.engine_pythonpath(), [
        step(*GRAPH_CHECK, env=_graph_check_env(ctx, "graph", a.variants, MBS=str(m))),
        step(*BENCH, "--seq-length", 4096, "--steps", 8, "--warmup", 3, "--micro-batch-size", m, "--compile",
             "--no-cuda-graph", *a.bench_args, "--json", d / f"compile_no_graph_mb{m}.json", timeout_s=200)])


@part("graphtest", "graph_check.sh's per-variant GPU tests alone, no bench", GRAPH_VARIANTS,
      timeout(400, "graph_check.sh"))
def graphtest(ctx: Context, a: argparse.Namespace) -> Plan:
    env = _graph_check_env(ctx, "graphtest", a.variants, BENCH="0")
    return Plan((step(*GRAPH_CHECK, env=env, timeout_s=a.timeout_s),))


@part("graphpre", "pretrain --cuda-graph end to end: stop + checkpoint + resume vs straight vs no graph",
      timeout(560, "graph_pretrain.sh"),
      opt("--seq-length", type=int, default=None,
          help="pretrain's sequence length (default: graph_pretrain.sh's, 1024)"))
def graphpre(ctx: Context, a: argparse.Namespace) -> Plan:
    env = {"OUT": str(ctx.part_dir("graphpre"))} | ({"SEQ": str(a.seq_length)} if a.seq_length else {})
    return Plan((step("bash", "benchmarks/gpu/graph_pretrain.sh", env=env, timeout_s=a.timeout_s),))


# ---- A/B of the compiled step ---------------------------------------------------------------------------------

@dataclass
class Variant:
    """One arm of `ab`: its name (file stem), its --ops value (None: the engine's defaults), its environment, the
    engine's source folder it runs (None: this tree's)."""

    name: str
    ops: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    src: str | None = None
    deterministic: bool = False


class _NewVariant(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):  # type: ignore[no-untyped-def]
        if not SAFE_NAME.match(value):
            raise argparse.ArgumentError(self, f"{value!r}: letters, digits, '.', '_', '-' only (it names files)")
        if any(v.name == value for v in namespace.variants):
            raise argparse.ArgumentError(self, f"{value!r} given twice (its runs would overwrite each other)")
        namespace.variants = [*namespace.variants, Variant(value)]


class _VariantField(argparse.Action):
    """An option set once on the variant just started: the Variant field named by the option's dest."""

    def __call__(self, parser, namespace, value, option_string=None):  # type: ignore[no-untyped-def]
        if not namespace.variants:
            raise argparse.ArgumentError(self, "comes after the --variant it belongs to")
        if getattr(namespace.variants[-1], self.dest) is not None:
            raise argparse.ArgumentError(self, f"given twice for variant {namespace.variants[-1].name!r}")
        setattr(namespace.variants[-1], self.dest, value)


class _VariantDeterministic(argparse.Action):
    """--deterministic on the variant just started: its bench runs with torch's deterministic algorithms."""

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, nargs=0, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):  # type: ignore[no-untyped-def]
        if not namespace.variants:
            raise argparse.ArgumentError(self, "comes after the --variant it belongs to")
        namespace.variants[-1].deterministic = True


class _VariantEnv(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):  # type: ignore[no-untyped-def]
        if not namespace.variants:
            raise argparse.ArgumentError(self, "comes after the --variant it belongs to")
        key, sep, val = value.partition("=")
        if not sep or not ENV_NAME.match(key):
            raise argparse.ArgumentError(self, f"{value!r}: expected NAME=VALUE")
        namespace.variants[-1].env[key] = val


def _ab_options(p: argparse.ArgumentParser) -> None:
    p.set_defaults(variants=[])
    p.add_argument("--variant", action=_NewVariant, metavar="NAME", required=True,
                   help="start a variant, repeatable; runs write NAME_r<round>.json; a name starting fa4_ runs "
                        "through bench_fa4_launch.py with --fa4-launch")
    p.add_argument("--ops", action=_VariantField, dest="ops", metavar="OP=IMPL,...",
                   help="the variant's bench --ops (omitted: the engine's defaults)")
    p.add_argument("--env", action=_VariantEnv, metavar="NAME=VALUE",
                   help="an environment variable of the variant's runs, repeatable (e.g. TORCHINDUCTOR_* switches)")
    p.add_argument("--engine-src", action=_VariantField, dest="src", metavar="DIR",
                   help="the variant runs the engine package under DIR (another version's src/, e.g. unpacked from "
                        "a `git archive`) instead of this tree's")
    p.add_argument("--deterministic", action=_VariantDeterministic, dest="variant_deterministic",
                   help="the variant's bench runs with --deterministic (what `pretrain --deterministic` costs)")
    p.add_argument("--fa4-launch", default=None, metavar="JSON",
                   help="FA4 forward launch values for fa4_* variants, a JSON object")


@part("ab", "the compiled step (graphed where it can be) per variant, alternated for --rounds rounds",
      opt("--rounds", type=int, default=1, help="alternations of all variants (default 1)"),
      opt("--steps", type=int, default=8, help="bench's timed steps (default 8)"),
      MBS,
      opt("--code", action="store_true", help="the first run also dumps Inductor's code (output_code.txt.gz)"),
      timeout(200, "each run"),
      extra=_ab_options)
def ab(ctx: Context, a: argparse.Namespace) -> Plan:
    d = ctx.part_dir("ab")
    common = ("--seq-length", "4096", "--steps", str(a.steps), "--warmup", "3", "--micro-batch-size",
              str(a.micro_batch_size), "--compile")
    steps: list[Step] = []
    for r in range(1, a.rounds + 1):
        for v in a.variants:
            run = (PY, "benchmarks/gpu/bench_fa4_launch.py", a.fa4_launch) if v.name.startswith("fa4_") else BENCH
            out = d / f"{v.name}_r{r}.json"
            argv = (*run, *common, *(("--ops", v.ops) if v.ops else ()), *(("--deterministic",) if v.deterministic else ()),
                    "--json", str(out))
            first_dump = a.code and not steps
            src = ctx.engine_pythonpath(v.src) if v.src else {}
            steps.append(step(*argv, timeout_s=240 if first_dump else a.timeout_s,
                              env={**src, **v.env, **({"TORCH_LOGS": "output_code"} if first_dump else {})},
                              stderr_file=d / "output_code.txt" if first_dump else None,
                              note=f"[ab] {v.name} round {r}: exit {{rc}}", json_summary=out))
    plan = with_env(ctx.engine_pythonpath(), steps)
    return Plan(plan.steps, gzip=(d / "output_code.txt",) if a.code else ())


def check_ab(a: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """What one option alone cannot say: fa4_* variants need --fa4-launch, a JSON object."""
    if any(v.name.startswith("fa4_") for v in a.variants):
        if a.fa4_launch is None:
            p.error("a variant named fa4_* needs --fa4-launch JSON")
    if a.fa4_launch is not None:
        try:
            ok = isinstance(json.loads(a.fa4_launch), dict)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            p.error(f"--fa4-launch {a.fa4_launch!r}: not a JSON object")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")


# ---- ops and their kernels ------------------------------------------------------------------------------------

@part("lce", "linear_cross_entropy=triton_fused: its op tests on the real kernels, the launch / chunk table, "
      "its graph test",
      timeout(200, "gpu_linear_ce.py"),
      fwd("--tokens", int, "tokens of the table's shape", "gpu_linear_ce.py"),
      fwd("--no-sweep", None, "time only the default launch and two chunks", "gpu_linear_ce.py"))
def lce(ctx: Context, a: argparse.Namespace) -> Plan:
    d = ctx.part_dir("lce")
    return with_env(ctx.engine_pythonpath(), [
        step(*PYTEST, f"{T}/ops/test_cross_entropy_triton.py", timeout_s=200),
        step(PY, f"{ENGINE}/scripts/gpu_linear_ce.py", "--out", d, *PARTS["lce"].forwarded(a), timeout_s=a.timeout_s),
        step(*GRAPH_CHECK, env=_graph_check_env(ctx, "lce", "linear-ce", BENCH="0", SANITIZE="0"), timeout_s=150)])


@part("qkvrope", "qkv_rope=triton_fused: its op tests on the real kernel, the registry tests, its CUDA-graph test")
def qkvrope(ctx: Context, a: argparse.Namespace) -> Plan:
    return with_env(ctx.engine_pythonpath(), [
        step(*PYTEST, f"{T}/ops/test_qkv_rope_triton.py", f"{T}/test_engine_registry.py", timeout_s=240),
        step(*GRAPH_CHECK, env=_graph_check_env(ctx, "qkvrope", "qkv-rope", BENCH="0", SANITIZE="0"), timeout_s=150)])


@part("quackops", "mlp=quack_dgated and linear_cross_entropy=quack_triton: their op tests on the real kernels, "
      "their graph tests",
      opt("--variants", nargs="+", default=["quack-dgated", "linear-ce-quack"], metavar="VARIANT",
          help="graph_check.sh's variants (default quack-dgated linear-ce-quack)"))
def quackops(ctx: Context, a: argparse.Namespace) -> Plan:
    return with_env(ctx.engine_pythonpath(), [
        step(*PYTEST, f"{T}/ops/test_mlp_quack.py", f"{T}/ops/test_linear_ce_quack_triton.py",
             f"{T}/test_engine_registry.py", timeout_s=300),
        step(*GRAPH_CHECK, env=_graph_check_env(ctx, "quackops", a.variants, BENCH="0", SANITIZE="0"),
             timeout_s=200)])


@part("lcegemms", "the fused output layer + CE per GEMM mode (cublas / quack / quack_lse), and its quack op tests",
      fwd("--tokens", int, "", "linear_ce_gemms.py"), fwd("--chunk", int, "", "linear_ce_gemms.py"),
      fwd("--rounds", int, "", "linear_ce_gemms.py"),
      fwd("--launches", str, "quack_lse's one-pass launches to add, BLOCK_V:warps[:split],...", "linear_ce_gemms.py"))
def lcegemms(ctx: Context, a: argparse.Namespace) -> Plan:
    return with_env(ctx.engine_pythonpath(), [
        step(*PYTEST, f"{T}/ops/test_linear_ce_quack_triton.py", f"{T}/ops/test_cross_entropy_triton.py",
             timeout_s=240),
        step(PY, "benchmarks/gpu/linear_ce_gemms.py", "--out", ctx.part_dir("lcegemms"),
             *PARTS["lcegemms"].forwarded(a), timeout_s=200)])


@part("gemms", "per-site GEMM election: cuBLAS vs quack (heuristic and pinned SM90 configs), fc2 dgrad with dSwiGLU",
      timeout(480, "gemm_election.py"),
      fwd("--budget-s", float, "", "gemm_election.py"),
      fwd("--sites", str, "comma-separated sites, e.g. o.fwd,o.dgrad", "gemm_election.py"),
      fwd("--configs", str, "a slice of CONFIGS tried per site, start:stop", "gemm_election.py"),
      fwd("--rounds", int, "", "gemm_election.py"))
def gemms(ctx: Context, a: argparse.Namespace) -> Plan:
    return with_env(ctx.engine_pythonpath(), [
        step(PY, "benchmarks/gpu/gemm_election.py", "--out", ctx.part_dir("gemms"), *PARTS["gemms"].forwarded(a),
             timeout_s=a.timeout_s)])


@part("wgrad", "weight-gradient GEMMs with a bf16 vs an fp32 output at the step's shapes")
def wgrad(ctx: Context, a: argparse.Namespace) -> Plan:
    return Plan((step(PY, "benchmarks/gpu/wgrad_out_dtype.py", "--out", ctx.part_dir("wgrad"), timeout_s=120),))


_FA4_SHAPE = ("--batch", "--seq", "--heads", "--kv-heads", "--head-dim")


@part("fa4fwd", "FA4 forward launch options at the step's attention shape",
      timeout(200, "fa4_fwd_configs.py"),
      *(fwd(f, int, "", "fa4_fwd_configs.py") for f in _FA4_SHAPE),
      fwd("--budget-s", float, "", "fa4_fwd_configs.py"), fwd("--rounds", int, "", "fa4_fwd_configs.py"))
def fa4fwd(ctx: Context, a: argparse.Namespace) -> Plan:
    return Plan((step(PY, "benchmarks/gpu/fa4_fwd_configs.py", "--out", ctx.part_dir("fa4fwd"),
                      *PARTS["fa4fwd"].forwarded(a), timeout_s=a.timeout_s),))


@part("fa4bwd", "FA4's SM90 backward tile configurations and the K/V-expanded (MHA) backward at the step's shape",
      timeout(300, "fa4_bwd_configs.py"),
      *(fwd(f, int, "", "fa4_bwd_configs.py") for f in _FA4_SHAPE),
      fwd("--budget-s", float, "", "fa4_bwd_configs.py"), fwd("--rounds", int, "", "fa4_bwd_configs.py"),
      fwd("--only", str, "comma-separated variant names, e.g. 'gqa default'", "fa4_bwd_configs.py"))
def fa4bwd(ctx: Context, a: argparse.Namespace) -> Plan:
    return Plan((step(PY, "benchmarks/gpu/fa4_bwd_configs.py", "--out", ctx.part_dir("fa4bwd"),
                      *PARTS["fa4bwd"].forwarded(a), timeout_s=a.timeout_s),))


@part("fa4cache", "FA4's persistent kernel cache in two processes: loaded, and bitwise the same results")
def fa4cache(ctx: Context, a: argparse.Namespace) -> Plan:
    return with_env(ctx.engine_pythonpath(), [
        step(PY, "benchmarks/gpu/fa4_cache_check.py", "--out", ctx.part_dir("fa4cache"), timeout_s=200)])


@part("tune", "stage 2's tune search per op of the 0.5B's default step that declares a space (tune_ops.py; with "
      "CuTeDSL unpacked that includes FA4 and quack): leaderboards, summary, tuned values",
      timeout(290, "tune_ops.py"),
      opt("--budget-s", type=int, default=260, help="tune_ops.py's budget (default 260)"),
      fwd("--ops", str, "comma-separated ops, searched in this order", "tune_ops.py"),
      fwd("--max-trials", int, "per op, the default's trial included", "tune_ops.py"),
      fwd("--random-trials", int, "", "tune_ops.py"), fwd("--seed", int, "", "tune_ops.py"),
      fwd("--preset", str, "", "tune_ops.py"), fwd("--dtype", str, "", "tune_ops.py"),
      *(fwd(f"--{n}", int, "", "tune_ops.py") for n in ("batch", "seq", "reps", "warmup")))
def tune(ctx: Context, a: argparse.Namespace) -> Plan:
    return Plan((step(PY, "-m", "benchmarks.gpu.tune_ops", "--out", ctx.part_dir("tune"), "--budget-s", a.budget_s,
                      *PARTS["tune"].forwarded(a), timeout_s=a.timeout_s),))


@part("startup", "pretrain's one-time costs run by run (startup_probe.py): stdout, log lines and exit stamped, "
      "dirty pages before each run",
      timeout(400, "startup_probe.py"),
      opt("--runs", nargs="+", default=["warm:10", "N:50", "2N:100"], metavar="NAME:STEPS[:nosave]",
          help="the runs in order (default warm:10 N:50 2N:100)"),
      fwd("--global-batch", int, "", "startup_probe.py"), fwd("--micro-batch", int, "", "startup_probe.py"))
def startup(ctx: Context, a: argparse.Namespace) -> Plan:
    d = ctx.part_dir("startup")
    return Plan((step(PY, "benchmarks/gpu/startup_probe.py", "--out", d, "--runs", *a.runs, *PARTS["startup"].forwarded(a),
                      timeout_s=a.timeout_s),
                 step("rm", "-rf", d / "work"),))


@part("elect", "stage 2's integration gate for one candidate (elect.py): the whole step before and after it on the "
      "gates' clock (M5's speed part), the loop's election rule, optionally M5's loss part on the candidate",
      timeout(570, "elect.py"),
      fwd("--set", str, "OP=IMPL of the candidate (with --values)", "elect.py"),
      fwd("--values", str, "JSON object of the op's parameters", "elect.py"),
      fwd("--tuned", str, "a tuned-config file: its entry for this runtime is the candidate", "elect.py"),
      fwd("--order", str, "the timings in order (default before,after)", "elect.py"),
      fwd("--loss-steps", int, "also M5's loss part on the candidate, this many steps", "elect.py"),
      fwd("--global-batch-size", int, "M5 speed's global batch (default 64)", "elect.py"),
      fwd("--micro-batch-size", int, "M5 speed's micro batch (default 8)", "elect.py"),
      fwd("--target-s", float, "M5 speed's timed window (default: the gates' own)", "elect.py"),
      fwd("--gate-timeout-s", int, "each gate's budget", "elect.py"))
def elect(ctx: Context, a: argparse.Namespace) -> Plan:
    return Plan((step(PY, "-m", "benchmarks.gpu.elect", "--out", ctx.part_dir("elect"), *ctx.sandbox_args(),
                      *PARTS["elect"].forwarded(a), timeout_s=a.timeout_s),))


GATE_MARGIN_S = 30  # after the gate's own timeout: it still writes its report (10 s lost a whole call)


def check_gate_margin(a: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """The part's outer timeout leaves the gate time to write its report once its own timeout hits."""
    if a.timeout_s < a.gate_timeout_s + GATE_MARGIN_S:
        p.error(f"--timeout-s {a.timeout_s} leaves the gate (--gate-timeout-s {a.gate_timeout_s}) less than "
                f"{GATE_MARGIN_S} s to write its report: a killed gate returns nothing")


def check_m5(a: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    check_gate_margin(a, p)
    if a.engine == E8 and not a.no_bench and a.case not in BENCH8_MODELS:
        p.error(f"the 8B's bench before M5 needs --case {' or '.join(BENCH8_MODELS)} (its model TOML), or --no-bench")


CHECKS: dict[str, Callable[[argparse.Namespace, argparse.ArgumentParser], None]] = {
    "ab": check_ab, "m5": check_m5, "stage": check_gate_margin}

# What session.sh once read from the environment: set now, it would be ignored, so the dispatcher refuses it.
LEGACY_ENV: dict[str, str] = {
    "AB": "ab --variant NAME [--ops OPS] [--env K=V] ...", "AB_STEPS": "ab --steps", "AB_CODE": "ab --code",
    "AB_TIMEOUT": "ab --timeout-s", "ROUNDS": "ab --rounds", "FA4_LAUNCH": "ab --fa4-launch",
    "MBS": "PART --micro-batch-size", "BENCH_EXTRA": "PART --bench-arg=WORD ...",
    "GEMM_ARGS": "gemms --sites/--configs/--rounds/--budget-s", "GEMM_S": "gemms --timeout-s",
    "FA4_ARGS": "fa4bwd --only/--batch/...", "FA4_S": "fa4fwd|fa4bwd --timeout-s",
    "TUNE_ARGS": "tune --ops/--max-trials/...", "TUNE_S": "tune --timeout-s", "TUNE_BUDGET_S": "tune --budget-s",
    "GATES_S": "gates --timeout-s", "BUDGET_S": "compare|agreement --budget-s", "STACKS": "compare --stacks",
    "MLP_TABLE_S": "mlp --table-timeout-s", "LCE_S": "lce --timeout-s", "LCE_ARGS": "lce --tokens/--no-sweep",
    "LCE_GEMMS_ARGS": "lcegemms --tokens/--chunk/--rounds/--launches",
    "VARIANTS": "graph|graphtest|quackops --variants",
    "GRAPHPRE_S": "graphpre --timeout-s", "GRAPHTEST_S": "graphtest --timeout-s", "STAGE_S": "stage --timeout-s",
    "GATES": "stage --gates", "SEQ": "stage|graphpre --seq-length", "GATE_S": "stage --gate-timeout-s",
    "M5_S": "m5 --timeout-s", "SPEED_STEPS": "m5 --speed-steps", "SPEED_GB": "m5 --speed-global-batch-size",
    "LT": "m5 --long-train-steps", "M5_GATE_S": "m5 --gate-timeout-s", "M5_ARGS": "m5 --m5-parts/--mfu-threshold/...",
}
