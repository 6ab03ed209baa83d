"""Tensor parallelism in a spec reaches every gate: `hardware.tp` is allowed on the CPU (gloo), and the loop's and
certify's gate runs (harness/gating.py runner_options), an agent's gate command, the gates' clock and the manifest
all carry it. No engine runs: the gate runner is faked."""

from __future__ import annotations

from pathlib import Path

import pytest

import gates.runner
from gates.report import GateReport
from harness import manifest as mf
from harness import timing
from harness.gating import GateOutcome, run_real_gate, runner_options
from harness.inspection import case_label, gate_rows
from harness.prompts import WORKSPACE_ROOT, gate_command
from harness.spec import SpecError, TimingSpec, load_spec, parse_spec

TP_SPEC = WORKSPACE_ROOT / "specs/minicpm4-8b-reduced-cpu-tp2.toml"
TINY = WORKSPACE_ROOT / "specs/tiny-cpu.toml"


def _spec(**hardware) -> dict:
    return {"name": "x", "model": {"preset": "tiny"}, "engine": {"path": "exports/e", "package": "e"},
            "hardware": hardware, "stages": [{"name": "m1", "gates": [{"name": "m1_forward"}]}]}


def test_tp_is_allowed_on_the_cpu() -> None:
    spec = parse_spec(_spec(device="cpu", tp=2, dp=2))
    assert (spec.hardware.device, spec.hardware.tp, spec.hardware.dp) == ("cpu", 2, 2)
    with pytest.raises(SpecError, match="hardware.tp"):
        parse_spec(_spec(device="cpu", tp=0))
    with pytest.raises(SpecError, match=r"gpus \(2\) must be at least tp x dp \(4\)"):  # the GPU's check stays
        parse_spec(_spec(device="cuda", gpus=2, tp=2, dp=2))


def test_the_cpu_tp2_spec_judges_the_8b_at_tp2() -> None:
    spec = load_spec(TP_SPEC)
    assert spec.hardware.device == "cpu" and spec.hardware.tp == 2 and spec.engine.package == "train_engine_8b"
    gates_ = [g for st in spec.stages for g in st.gates]
    assert {g.case for g in gates_} == {"minicpm4-8b-reduced"} and {g.dtype for g in gates_} == {"float32"}
    assert {g.name: g.world_size for g in gates_ if g.world_size} == {"m4_data_parallel": 2, "m7_pretrain": 2}
    assert all(g.policy == "dtype" for g in gates_)  # no bound raised
    m5 = spec.stage("m5").gates[0]  # a stable lr on this preset (the spec's comment), the 1 % bound kept
    assert (m5.long_train_lr, m5.long_train_threshold, m5.allow_unsupported) == (1e-3, 0.01, ["mfu"])


@pytest.mark.parametrize("path, tp", [(TP_SPEC, 2), (TINY, 1)])
def test_every_gate_gets_the_spec_tp(path: Path, tp: int, tmp_path: Path, monkeypatch) -> None:
    spec = load_spec(path)
    seen = []

    def fake_run_gate(name, engine, options):
        seen.append((name, options))
        return GateReport(gate=name, verdict="passed", message="fake", engine=str(engine))

    monkeypatch.setattr(gates.runner, "run_gate", fake_run_gate)
    checks = [g for st in spec.stages for g in st.gates]
    for i, gate in enumerate(checks):
        assert runner_options(gate, spec, tmp_path)["tp"] == tp
        out = run_real_gate(gate, tmp_path / "engine", spec, tmp_path / f"{i}")
        assert out.verdict == "passed", out.localization
        assert f"--tp {tp}" in gate_command(spec, gate, tmp_path) if tp > 1 else "--tp" not in gate_command(spec, gate, tmp_path)
    assert [n for n, _ in seen] == [g.name for g in checks]
    for gate, (_, options) in zip(checks, seen):
        assert options.tp == tp and options.world_size == gate.world_size and options.case == gate.case


def test_the_gates_clock_gets_the_spec_tp(monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(timing, "run_gate_timing", lambda engine, **kw: seen.update(kw) or (1.0, "fake"))
    timing.gate_step_clock(Path("e"), TimingSpec(options={"speed_steps": 3}), load_spec(TP_SPEC))
    assert seen["options"] == {"tp": 2, "speed_steps": 3}


def test_the_manifest_records_tp_and_inspect_shows_the_layout(tmp_path: Path) -> None:
    spec = load_spec(TP_SPEC)
    m4 = spec.stage("m4").gates[0]
    out = GateOutcome(m4.name, "passed", {"worst_rel": 1e-7}, None, 90.0, None, {})
    m, _ = mf.record_gates({}, spec=spec, spec_path=str(TP_SPEC), spec_sha256="0", engine_name="train_engine_8b",
                           stage="m4", round_no=None, commit="c" * 40, results=[(m4, out)], hardware={},
                           writer="certify")
    entry = m["gates"]["m4_data_parallel"]
    assert entry["tp"] == 2 and entry["world_size"] == 2 and m["spec"]["hardware"]["tp"] == 2
    assert gate_rows(m, tmp_path)[0]["case"] == "minicpm4-8b-reduced float32 TP=2 DP=2"
    assert case_label({"case": "tiny", "dtype": "float32", "world_size": None}) == "tiny float32"  # older manifests


def test_a_spec_long_train_lr_sets_m5s_case_lr(tmp_path: Path, monkeypatch) -> None:
    """`long_train_lr` (spec -> GateOptions) is the peak lr of M5's long-train case, min lr a tenth of it, on the
    reference's case and the engine's pretrain alike (both read the case); the engine is not run here."""
    import gates.m5_long_train as m5
    from gates.context import GateRun, GateStop
    from gates.launch import discover_engine
    from gates.options import GateOptions

    check = parse_spec({**_spec(), "stages": [{"name": "m5", "gates": [{"name": "m5_long_train",
                                                                         "long_train_lr": 3e-3}]}]}).stages[0].gates[0]
    options = GateOptions(**{k: v for k, v in runner_options(check, parse_spec(_spec()), tmp_path).items()
                             if k != "out_dir"} | {"long_train_steps": 4})
    assert options.long_train_lr == 3e-3 and GateOptions().long_train_lr == 1e-2
    seen = {}

    class Box:
        def __init__(self, g, case) -> None:  # noqa: ANN001
            seen["optimizer"] = case.spec.optimizer

        def run(self, *args, **kw) -> None:  # noqa: ANN002, ANN003
            raise GateStop("error", "stopped by the test")

    monkeypatch.setattr(m5, "PretrainBox", Box)
    g = GateRun("m5_long_train", discover_engine(WORKSPACE_ROOT / "exports/train_engine_0.5B"), options)
    try:
        with pytest.raises(GateStop):
            m5.long_train(g)
    finally:
        g.cleanup()
    assert seen["optimizer"].lr == 3e-3 and seen["optimizer"].min_lr == pytest.approx(3e-4)


def test_inspect_says_when_an_engine_lists_no_ops(tmp_path: Path) -> None:
    from harness.inspection import registry_ops

    eng = tmp_path / "eng"
    (eng / "src/quiet_pkg").mkdir(parents=True)
    (eng / "src/quiet_pkg/__main__.py").write_text("print('presets: a, b')\n")
    rows, note = registry_ops(eng, "quiet_pkg")
    assert rows == [] and "lists no op registry" in note


def test_the_manifest_names_a_workspace_spec_relative_to_the_workspace(tmp_path: Path) -> None:
    """certify resolves --spec; the manifest ships in the repository, so it must not name the writer's checkout."""
    spec = load_spec(TP_SPEC)
    m1 = spec.stage("m1").gates[0]
    for given, recorded in [(str(TP_SPEC.resolve()), "specs/minicpm4-8b-reduced-cpu-tp2.toml"),
                            (str(tmp_path / "mine.toml"), str(tmp_path / "mine.toml"))]:
        m, _ = mf.record_gates({}, spec=spec, spec_path=given, spec_sha256="0", engine_name="e", stage="m1",
                               round_no=None, commit="c" * 40, results=[(m1, GateOutcome(m1.name, "passed"))],
                               hardware={}, writer="certify")
        assert m["spec"]["path"] == recorded


def test_inspect_shows_m5s_deciding_statistic_first() -> None:
    from harness.inspection import key_numbers

    m5 = {"tensors": 40, "worst_tensor": "loss_curve:losses[38]", "worst_rel": 6.6e-5, "worst_max_rel": 6.6e-5,
          "loss.window_mean_rel_diff": 1.6e-5}
    assert [k for k, _ in key_numbers(m5)] == ["loss.window_mean_rel_diff", "worst_tensor", "worst_rel"]
    m1 = {"tensors": 5, "worst_tensor": "logits", "worst_rel": 3.6e-7, "worst_max_rel": 4.3e-7, "seed": 1}
    assert [k for k, _ in key_numbers(m1)] == ["worst_tensor", "worst_rel", "worst_max_rel"]
