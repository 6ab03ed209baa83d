"""Forge specs: the shipped ones load; every invalid field is reported by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.spec import SpecError, load_spec, parse_spec

SPECS = sorted((Path(__file__).resolve().parents[2] / "specs").glob("*.toml"))


def test_shipped_specs_load() -> None:
    names = {p.name for p in SPECS}
    assert {"minicpm4-0.5b-h100.toml", "minicpm4-8b-h100-tp2.toml", "tiny-cpu.toml"} <= names
    for p in SPECS:
        spec = load_spec(p)
        assert spec.stages and all(s.gates for s in spec.stages)
        engine = p.parents[1] / spec.engine.path  # the export it forges or certifies is in the tree
        assert (engine / "src" / spec.engine.package).is_dir(), (p.name, spec.engine.path, spec.engine.package)
    tiny = load_spec(SPECS[[p.name for p in SPECS].index("tiny-cpu.toml")])
    assert [s.name for s in tiny.stages] == ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8"] and tiny.hardware.device == "cpu"
    big = load_spec(SPECS[[p.name for p in SPECS].index("minicpm4-8b-h100-tp2.toml")])
    assert big.reference == "megatron" and big.hardware.tp == 2 and big.stage("ops").agent.backend == "tune"


def test_shipped_ops_stages_name_ops_their_engine_runs() -> None:
    """An ops stage tunes what the engine's model calls at the spec's TP degree (gates/ops describe), never an op of
    the shared table it leaves unused: the loop refuses one before any round (election._check_ops_stage)."""
    from gates.ops.harness import describe

    checked = 0
    for p in SPECS:
        spec = load_spec(p)
        ops = [op for s in spec.stages if s.kind == "ops" for op in s.ops]
        if ops:
            table = describe(p.parents[1] / spec.engine.path, tp=spec.hardware.tp)
            assert [why for op in ops if (why := table.unknown(op))] == [], p.name
            checked += 1
    assert checked >= 3


def _base() -> dict:
    return {"name": "x", "model": {"preset": "tiny"}, "engine": {"path": "exports/e", "package": "e"},
            "stages": [{"name": "m1", "gates": [{"name": "m1_forward"}]}]}


@pytest.mark.parametrize("mutate, field, message", [
    (lambda d: d.update(modle={}), "modle", "unknown key"),
    (lambda d: d["model"].update(preset="tiny-2"), "model.preset", "unknown model preset 'tiny-2'"),
    (lambda d: d["stages"][0]["gates"][0].update(name="m9_magic"), "stages.0.gates.0.name", "unknown gate 'm9_magic'"),
    (lambda d: d["stages"][0]["gates"][0].update(policy="loose"), "stages.0.gates.0.policy", "bad policy 'loose'"),
    (lambda d: d["stages"][0]["gates"][0].update(world_size=1), "stages.0.gates.0.world_size", "greater than or equal to 2"),
    (lambda d: d.update(budgets={"rounds_per_stage": 0}), "budgets.rounds_per_stage", "greater than or equal to 1"),
    (lambda d: d.update(agent={"backend": "gpt-agent"}), "agent.backend", "unknown backend 'gpt_agent'"),
    (lambda d: d.update(agent={"env_allow": ["PATH", "HF_TOKEN"]}), "agent.env_allow", "'HF_TOKEN' looks like a secret"),
    (lambda d: d.update(reference="megatron"), "(spec)", "reference 'megatron' runs on the GPU"),
    (lambda d: d["engine"].update(allowed_paths=["../gates/**"]), "engine.allowed_paths", "must be relative"),
    (lambda d: d["stages"].append({"name": "m1", "gates": [{"name": "m2_backward"}]}), "(spec)", "repeated: m1"),
    (lambda d: d["stages"].append({"name": "ops", "kind": "ops", "ops": ["rmsnorm"], "gates": [{"name": "m1_forward"}]}),
     "stages.1", "needs [stages.timing]"),
    (lambda d: d["stages"][0].update(gates=[]), "stages.0.gates", "at least 1 item"),
    (lambda d: d["engine"].pop("package"), "engine.package", "required key missing"),
    (lambda d: d.update(hardware={"device": "cuda", "gpus": 1, "tp": 2}), "hardware", "gpus (1) must be at least tp x dp (2)"),
])
def test_errors_name_the_field(mutate, field, message) -> None:
    data = _base()
    mutate(data)
    with pytest.raises(SpecError) as e:
        parse_spec(data, "test.toml")
    text = str(e.value)
    assert text.startswith("invalid forge spec (test.toml):")
    assert any(line.strip().startswith(f"{field}:") and message in line for line in text.splitlines()), text


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)


def test_backend_options_errors_name_the_option() -> None:
    from harness.agents import BackendError, get_backend

    with pytest.raises(BackendError, match=r"agent.options.comand: unknown option"):
        get_backend("shell", {"comand": "x"})
    with pytest.raises(BackendError, match=r"agent.options.command: Field required"):
        get_backend("shell", {})
    with pytest.raises(BackendError, match="needs agent.model"):
        get_backend("openai", {})


def test_forge_cli_reports_spec_errors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from harness.cli import app

    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[model]\npreset = "tiny"\n[engine]\npath = "."\npackage = "p"\n'
                   '[[stages]]\nname = "m1"\n[[stages.gates]]\nname = "m1_forward"\npolicy = "close-enough"\n')
    r = CliRunner().invoke(app, ["forge", "--spec", str(bad)])
    assert r.exit_code == 2
    assert "stages.0.gates.0.policy: bad policy 'close-enough'" in r.output
