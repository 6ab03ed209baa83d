"""Forge specs: one TOML file says what to forge (model x hardware x reference), how to judge it (stages,
gates, thresholds, tolerance policies), what it may cost (budgets) and who writes the code (agent).

    spec = load_spec("specs/tiny-cpu.toml")        # raises SpecError naming the offending field

Layout of a spec (every table is optional except [model], [engine] and [[stages]]):

    name, description
    [model]      preset                                      a gates.model_config preset
    [hardware]   name, device, gpus, tp, dp                  what the engine is specialized for
    reference    "torch" | "megatron"                        the stack gates compare against
    [engine]     path, package, allowed_paths                what the agent may touch, relative to the engine
    [budgets]    rounds_per_stage, wall_time_s, tokens, cost_usd
    [agent]      backend, model, timeout_s, env_allow, env, sandbox, share, [agent.options]
    [loop]       carry_failed_edits, regression, land
    [[stages]]   name, kind ("gates" | "ops"), prompt, rounds, [[stages.gates]], ops, [stages.timing], [stages.agent]
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gates.model_config import validation_lines
from harness.secrets import SECRET_NAME

# Stage-1 gates (gates/runner.py's GATES; DESIGN.md, "Gates"). Kept here so a spec validates without
# importing the gates; `known_gates()` adds whatever the runner registers once it exists.
STAGE1_GATES = ("m1_forward", "m2_backward", "m3_optimizer", "m4_data_parallel", "m5_long_train", "m6_checkpoint")
# Every backend name a spec may use; harness/agents registers the ones importable here.
BACKEND_NAMES = ("claude_code", "codex", "anthropic", "openai", "shell", "replay", "tune")
DEFAULT_ENV_ALLOW = ["PATH", "HOME", "LANG", "LC_ALL", "TERM", "TMPDIR", "USER"]
IDENT = r"^[a-z][a-z0-9_]*$"


class SpecError(ValueError):
    """A spec that cannot be used; the message names the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def known_gates() -> tuple[str, ...]:
    """Stage-1 gate names plus any the gate runner registers (when gates/runner.py is importable)."""
    try:
        from gates.runner import GATES  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - not built yet, or broken: the static list still validates specs
        return STAGE1_GATES
    return tuple(dict.fromkeys([*STAGE1_GATES, *GATES]))


class GateCheck(_Strict):
    """One gate run inside a stage. Fields mirror gates.options.GateOptions (left unset: the runner's
    default); `allow_unsupported` is the harness's own: which parts may be `unsupported`."""

    name: str = Field(description="a gate of gates/runner.py, e.g. m1_forward")
    case: str = Field("tiny", description="model preset (a fresh random case each run) or a case directory")
    dtype: Literal["float32", "bfloat16", "float64"] | None = Field(None, description="default: fp32 cpu, bf16 cuda")
    device: Literal["cpu", "cuda"] | None = Field(None, description="default: the spec's hardware.device")
    world_size: int | None = Field(None, ge=2, description="M4's data-parallel size")
    policy: str = Field("dtype", description="bitwise | dtype (per-dtype bounds) | rel=X,max=Y")
    seed: int | None = Field(None, description="None: a fresh random seed each run (recorded in the report)")
    steps: int | None = Field(None, ge=2, description="optimizer steps of M3 / M4 / M6 cases")
    seq_length: int | None = Field(None, ge=2)
    micro_batch_size: int | None = Field(None, ge=1)
    long_train_steps: int | None = Field(None, ge=2, description="M5: steps of the long run")
    long_train_window: int | None = Field(None, ge=1, description="M5: trailing window of the loss statistic")
    long_train_threshold: float | None = Field(None, gt=0, description="M5: bound on the window's mean relative loss difference")
    long_train_lr: float | None = Field(None, gt=0, description="M5: peak lr of the long run (default 1e-2)")
    mfu_threshold: float | None = Field(None, ge=0, le=1, description="M5: MFU the engine must reach (GPU)")
    speed_seq_length: int | None = Field(None, ge=2, description="M5 speed: sequence length of the timed pretrain")
    speed_micro_batch_size: int | None = Field(None, ge=1)
    speed_global_batch_size: int | None = Field(None, ge=1)
    speed_steps: int | None = Field(None, ge=2)
    speed_settle_steps: int | None = Field(None, ge=1, description="M5 speed: the timed run's steps before its window")
    pretrain_args: list[str] | None = Field(None, description="production flags added to every gated `pretrain`")
    timeout_s: float | None = Field(None, gt=0, description="a gate over time is verdict `error` (timeout)")
    sandbox: Literal["required", "preferred", "off"] | None = Field(
        None, description="engine isolation (gates/sandbox.py); default required: no bubblewrap is verdict `error`")
    allow_unsupported: list[str] = Field(
        default_factory=list, description="parts (e.g. 'mfu' on a CPU) whose `unsupported` verdict is accepted, "
        "when every other part passed; '*' accepts a wholly unsupported gate. Recorded as unsupported, never as passed")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        names = known_gates()
        if v not in names:
            raise ValueError(f"unknown gate {v!r}; one of {', '.join(names)}")
        return v

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        if v in ("bitwise", "dtype"):
            return v
        for part in filter(None, (p.strip() for p in v.split(","))):
            key, _, value = part.partition("=")
            try:
                ok = key in ("rel", "max") and float(value) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"bad policy {v!r}: expected bitwise, dtype or rel=X,max=Y")
        return v

    def runner_options(self) -> dict[str, Any]:
        """The GateOptions fields this check sets (everything else: the runner's default)."""
        skip = {"name", "allow_unsupported"}
        return {k: v for k, v in self.model_dump().items() if k not in skip and v is not None}


class TimingSpec(_Strict):
    """How an ops stage times a candidate: always on the gates' clock, M5's speed part (the engine's `pretrain`
    timed from outside; `metric` one of step_time_s, tokens_per_s, mfu; `options` sets its GateOptions, e.g.
    speed_seq_length). `command` exists only so that a spec still naming one is refused with a clear message
    (the loop, before any state): an engine's own figure never decides an election."""

    command: str | None = Field(None, description="refused when set: elections run on the gates' clock")
    metric: str = Field("step_time_s", description="the figure compared between candidates")
    minimize: bool = True
    timeout_s: float = Field(600.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict, description="GateOptions of the gates' clock (speed_*)")


class AgentSpec(_Strict):
    """Who writes the code: a backend of harness/agents and its options."""

    backend: str = "replay"
    model: str | None = Field(None, description="the service's model name, where the backend takes one")
    timeout_s: float = Field(3600.0, gt=0, description="wall time of one agent round")
    env_allow: list[str] = Field(default_factory=lambda: list(DEFAULT_ENV_ALLOW),
                                 description="harness environment names passed through to the agent's processes")
    env: dict[str, str] = Field(default_factory=dict, description="extra variables set for the agent's processes")
    sandbox: Literal["required", "preferred", "off"] = Field(
        "required", description="the round sandbox (harness/isolation.py); required: no bubblewrap stops the run")
    share: list[str] = Field(default_factory=list, description="host paths shown read-only to the agent's processes "
                             "(a script, a tool's install dir); everything else outside the worktree is hidden or read-only")
    options: dict[str, Any] = Field(default_factory=dict, description="backend options (see the backend's Options)")

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        v = v.replace("-", "_")
        if v not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {v!r}; one of {', '.join(BACKEND_NAMES)}")
        return v

    @field_validator("env_allow", "env")
    @classmethod
    def _no_secrets(cls, v: Any) -> Any:
        for name in v:
            if SECRET_NAME.search(name):
                raise ValueError(f"{name!r} looks like a secret; API keys and tokens never reach the agent's processes")
        return v


class StageSpec(_Strict):
    """One stage: a prompt, the gates that decide it, and its round budget."""

    name: str = Field(pattern=IDENT)
    kind: Literal["gates", "ops"] = "gates"
    prompt: str | None = Field(None, description="template under prompts/ (default: <name>.md.j2, op_round for ops)")
    rounds: int | None = Field(None, ge=1, description="overrides budgets.rounds_per_stage (per op for ops stages)")
    gates: list[GateCheck] = Field(min_length=1)
    ops: list[str] = Field(default_factory=list, description="ops stage: the op registry entries, in order")
    timing: TimingSpec | None = None
    agent: AgentSpec | None = Field(None, description="overrides [agent] for this stage (e.g. tune for ops)")

    @model_validator(mode="after")
    def _kind(self) -> "StageSpec":
        if self.kind == "ops" and not self.ops:
            raise ValueError("an ops stage names at least one op in `ops`")
        if self.kind == "ops" and self.timing is None:
            raise ValueError("an ops stage needs [stages.timing]: elections compare its times")
        if self.kind == "gates" and self.ops:
            raise ValueError("`ops` is only for stages of kind 'ops'")
        return self

    @property
    def template(self) -> str:
        return self.prompt or ("op_round" if self.kind == "ops" else self.name)


class ModelSpec(_Strict):
    preset: str

    @field_validator("preset")
    @classmethod
    def _preset(cls, v: str) -> str:
        from gates.model_config import PRESETS

        if v not in PRESETS:
            raise ValueError(f"unknown model preset {v!r}; one of {', '.join(PRESETS)}")
        return v


class HardwareSpec(_Strict):
    name: str = Field("cpu", description="e.g. cpu, h100, h200")
    device: Literal["cpu", "cuda"] = "cpu"
    gpus: int = Field(0, ge=0)
    tp: int = Field(1, ge=1, description="tensor-parallel degree: every gate runs each engine data-parallel rank as tp "
                    "processes with `--tp` (GateOptions.tp); cuda or cpu (gloo)")
    dp: int = Field(1, ge=1, description="the data-parallel size the engine targets (M4 / M7 take theirs from each "
                    "gate's world_size)")

    @model_validator(mode="after")
    def _consistent(self) -> "HardwareSpec":
        if self.device == "cuda" and self.gpus < self.tp * self.dp:
            raise ValueError(f"gpus ({self.gpus}) must be at least tp x dp ({self.tp * self.dp})")
        return self  # on a CPU tp x dp processes share its cores over gloo: slow, but the gates judge TP there


class EngineSpec(_Strict):
    path: str = Field(description="the export, relative to the workspace root (or absolute)")
    package: str = Field(description="the engine's Python package under src/")
    allowed_paths: list[str] = Field(
        default_factory=lambda: ["src/**", "tests/**", "README.md"],
        description="globs relative to the engine dir the agent may change; everything else rejects the round")

    @field_validator("allowed_paths")
    @classmethod
    def _relative(cls, v: list[str]) -> list[str]:
        for p in v:
            if p.startswith("/") or ".." in Path(p).parts:
                raise ValueError(f"{p!r} must be relative to the engine dir and stay inside it")
        return v


class Budgets(_Strict):
    rounds_per_stage: int = Field(5, ge=1)
    wall_time_s: float | None = Field(None, gt=0, description="the whole run, summed over resumes")
    tokens: int | None = Field(None, gt=0, description="input + output tokens, the whole run")
    cost_usd: float | None = Field(None, gt=0, description="the whole run")


class LoopSpec(_Strict):
    carry_failed_edits: bool = Field(True, description="a failed round's edits start the next round's worktree")
    regression: bool = Field(False, description="re-run the gates of passed stages before a stage's own")
    land: bool = Field(True, description="fast-forward the checked-out branch to each passing commit when it can")


class ForgeSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    model: ModelSpec
    hardware: HardwareSpec = HardwareSpec()
    reference: Literal["torch", "megatron"] = "torch"
    engine: EngineSpec
    budgets: Budgets = Budgets()
    agent: AgentSpec = AgentSpec()
    loop: LoopSpec = LoopSpec()
    stages: list[StageSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _cross(self) -> "ForgeSpec":
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {', '.join(dup)}")
        if self.reference == "megatron" and self.hardware.device != "cuda":
            raise ValueError("reference 'megatron' runs on the GPU: set hardware.device = 'cuda'")
        for i, st in enumerate(self.stages):
            for j, g in enumerate(st.gates):
                if (g.device or self.hardware.device) == "cuda" and self.hardware.device != "cuda":
                    raise ValueError(f"stages.{i}.gates.{j}.device: 'cuda' on hardware.device = 'cpu'")
        return self

    def stage(self, name: str) -> StageSpec:
        for st in self.stages:
            if st.name == name:
                return st
        raise KeyError(f"no stage {name!r} in spec {self.name}; stages: {', '.join(s.name for s in self.stages)}")

    def agent_for(self, stage: StageSpec) -> AgentSpec:
        return stage.agent or self.agent

    def rounds_for(self, stage: StageSpec) -> int:
        return stage.rounds or self.budgets.rounds_per_stage


def _describe(e: ValidationError, source: str) -> str:
    return "\n".join([f"invalid forge spec ({source}):", *validation_lines(e, "(spec)")])


def parse_spec(data: dict[str, Any], source: str = "<dict>") -> ForgeSpec:
    try:
        return ForgeSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_describe(e, source)) from None


def load_spec(path: str | Path) -> ForgeSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"forge spec not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    return parse_spec(data, str(path))


def spec_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def with_overrides(spec: ForgeSpec, *, engine_path: str | None = None, backend: str | None = None,
                   options: dict[str, Any] | None = None, model: str | None = None) -> ForgeSpec:
    """The spec with command-line overrides applied (validated again, so errors still name the field).

    `backend` runs every stage; each [agent] / [stages.agent] table keeps its backend-neutral fields (timeout,
    environment, sandbox, share) and, where it already named that backend, its options and model too.
    `options` and `model` then apply to every table."""
    data = spec.model_dump(mode="python")
    if engine_path is not None:
        data["engine"]["path"] = engine_path
    tables = [data["agent"]] + [st["agent"] for st in data["stages"] if st["agent"] is not None]
    for table in tables:
        if backend is not None and table["backend"] != backend.replace("-", "_"):
            table["backend"], table["options"], table["model"] = backend, {}, None
        if options:
            table["options"] = {**table["options"], **options}
        if model is not None:
            table["model"] = model
    return parse_spec(data, "command-line overrides")
