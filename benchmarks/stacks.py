"""The benchmark's stacks: how to run each one's timed steps as a subprocess.

Built-in stacks run a runner of this package (benchmarks/runner.py's contract); engines run their own
`bench` command (exports/README.md); torchtitan is recorded as unsupported with the reason.
"""

from __future__ import annotations

import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

TORCHTITAN_REASON = (
    "not run: torchtitan's Llama-3 model reaches these shapes only through ffn_dim_multiplier=1.5 / multiple_of=256, "
    "has no MiniCPM scales and an untied output; its trainer needs its own dependencies (torchdata, tyro, tiktoken, "
    "...) and data/tokenizer setup that are neither on the GPU image nor packed with this run"
)


@dataclass
class Stack:
    """One row of the comparison. `argv` is None for a stack recorded without running (`skip_reason`)."""

    name: str
    kind: str  # megatron | torch | torchtitan | engine
    argv: list[str] | None
    env: dict[str, str] = field(default_factory=dict)
    engine_contract: bool = False  # True: `bench --seq-length --micro-batch-size --steps --json` (+ `--model CONFIG.json` for another model)
    engine_dir: Path | None = None  # engines: their folder (the gate-timed row runs its `pretrain`)
    skip_reason: str | None = None
    note: str = ""


BUILTIN: dict[str, Stack] = {
    "megatron": Stack("megatron", "megatron", [PY, "-m", "benchmarks.bench_megatron", "--attention", "unfused"],
                      note="megatron-core local spec as shipped (no TE/apex): unfused core attention"),
    "megatron-sdpa": Stack("megatron-sdpa", "megatron", [PY, "-m", "benchmarks.bench_megatron", "--attention", "sdpa"],
                           note="megatron-core local spec, core attention swapped to torch SDPA (stand-in for TE fused attention)"),
    "torch-eager": Stack("torch-eager", "torch", [PY, "-m", "benchmarks.bench_torch", "--mode", "eager"],
                         note="eager PyTorch, reference math, SDPA, fused AdamW"),
    "torch-compile": Stack("torch-compile", "torch", [PY, "-m", "benchmarks.bench_torch", "--mode", "compile"],
                           note="torch.compile of the same"),
    "torchtitan": Stack("torchtitan", "torchtitan", None, skip_reason=TORCHTITAN_REASON),
}
DEFAULT_STACKS = ("megatron", "megatron-sdpa", "torch-eager", "torch-compile", "torchtitan", "engines")


def engine_model(engine_dir: Path) -> str | None:
    """The model an engine is specialized for, from its model_spec.toml ([model] preset or name)."""
    spec = engine_dir / "model_spec.toml"
    if not spec.is_file():
        return None
    try:
        model = tomllib.loads(spec.read_text()).get("model", {})
    except tomllib.TOMLDecodeError:
        return None
    return model.get("preset") or model.get("name")


def discover_engines(exports: Path, model: str) -> list[Stack]:
    """One stack per engine folder under `exports/`; engines without a CLI or for another model are
    listed with the reason they are skipped."""
    out: list[Stack] = []
    for d in sorted(p for p in exports.iterdir() if p.is_dir() and not p.name.startswith(".")) if exports.is_dir() else []:
        name = f"engine:{d.name}"
        pkgs = sorted(p for p in (d / "src").glob("*") if (p / "__init__.py").is_file()) if (d / "src").is_dir() else []
        mains = [p for p in pkgs if (p / "__main__.py").is_file()]
        if len(mains) != 1:
            why = "no CLI yet (src/<pkg>/__main__.py missing)" if not mains else f"several CLI packages: {[p.name for p in mains]}"
            out.append(Stack(name, "engine", None, skip_reason=why))
            continue
        spec_model = engine_model(d)
        if spec_model is not None and spec_model != model and model != "tiny":  # tiny: every engine's math, small
            out.append(Stack(name, "engine", None, skip_reason=f"engine is for {spec_model}, not {model}"))
            continue
        out.append(Stack(name, "engine", [PY, "-m", mains[0].name, "bench"], env={"PYTHONPATH": str(d / "src")},
                         engine_contract=True, engine_dir=d, note=f"{d.name} bench command (self-reported)"))
    return out


def resolve(names: list[str], model: str, exports: Path = REPO / "exports") -> list[Stack]:
    """Stack names (built-ins, `engines` for every engine, or `engine:DIR`) -> stacks, in order."""
    stacks: list[Stack] = []
    engines = None
    for n in names:
        if n in BUILTIN:
            stacks.append(BUILTIN[n])
        elif n == "engines" or n.startswith("engine:"):
            engines = engines if engines is not None else discover_engines(exports, model)
            picked = engines if n == "engines" else [e for e in engines if e.name == n]
            if not picked and n != "engines":
                raise ValueError(f"no engine folder for {n!r} under {exports}")
            stacks.extend(picked)
        else:
            raise ValueError(f"unknown stack {n!r}; one of {', '.join([*BUILTIN, 'engines', 'engine:DIR'])}")
    return stacks
