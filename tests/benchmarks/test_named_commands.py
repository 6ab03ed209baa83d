"""`python -m benchmarks`: without a name it lists every named experiment and every GPU session script; a name
runs its module's own command line (its exit code is the command's)."""

from __future__ import annotations

from typer.testing import CliRunner

from benchmarks.__main__ import COMMANDS, GPU_DIR, app


def test_the_listing_names_every_command_and_gpu_script() -> None:
    r = CliRunner().invoke(app, [], terminal_width=200)
    assert r.exit_code == 0
    for name in COMMANDS:
        assert f" {name} " in r.output
    scripts = sorted(p.name for p in GPU_DIR.iterdir() if p.suffix in (".py", ".sh"))
    assert scripts and all(s in r.output for s in scripts)


def test_a_name_runs_its_module_and_keeps_its_exit_code(tmp_path) -> None:
    ok = CliRunner().invoke(app, ["results", "check"])
    assert ok.exit_code == 0 and "all indexed" in ok.output
    (tmp_path / "index.jsonl").write_text("not json\n")
    bad = CliRunner().invoke(app, ["results", "--root", str(tmp_path), "check"])
    assert bad.exit_code == 1
