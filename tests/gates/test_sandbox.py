"""Engine isolation (gates/sandbox.py): every red-team escape engine's attempt fails inside the sandbox and
the report shows it; tampering with the reference or the interpreter, an engine leaving a way out of its
sandbox, and a missing sandbox are verdicts. Where it is cheap, a control run without the sandbox shows the
check would see the escape."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gates.context import GateRun
from gates.launch import WORKSPACE, GateTimeout, discover_engine, engine_cache_env
from gates.runner import GateOptions, run_gate
from gates.sandbox import Watched, changes, fingerprint, isolation, watched_paths

ENGINES = Path(__file__).resolve().parents[1] / "redteam" / "engines"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """Engine caches (and the orphan's beat file) under this test's own directory."""
    cache = tmp_path / "forge-cache"
    monkeypatch.setenv("FORGE_CACHE_DIR", str(cache))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return cache


def escape_probe(name: str, sandbox: str = "required", timeout_s: float = 180.0) -> tuple[GateRun, dict]:
    """Run a red-team escape engine's forward probe through the gate machinery; its recorded attempt."""
    g = GateRun("m1_forward", discover_engine(ENGINES / name), GateOptions(seed=1, timeout_s=timeout_s, sandbox=sandbox))
    try:
        _, metrics, _ = g.engine_probe("forward", g.make_case())
    finally:
        g.cleanup()
    return g, metrics["escape"]


def fake_engine(root: Path, body: str) -> Path:
    src = root / "src" / "fake"
    src.mkdir(parents=True)
    (src / "__main__.py").write_text(textwrap.dedent(body))
    return root


def run_fake(engine: Path, sandbox: str = "required", nproc: int = 1, **options) -> tuple[GateRun, Path]:
    """One engine command of a fake engine in a fresh sandbox; the gate run and the (kept) sandbox root."""
    g = GateRun("m1_forward", discover_engine(engine), GateOptions(seed=1, timeout_s=180, sandbox=sandbox, **options))
    box = g.sandbox(None)
    box.case.mkdir()
    g.run_engine(["probe", "forward", "--case", str(box.case), "--out", str(box.out)], box, "engine probe forward", nproc)
    return g, box.root


NO_EDITABLE = "the editable install maps `gates` to no existing dir on this host: nothing for the escape to reach"


def editable_gates_dir() -> Path | None:
    """Where the workspace's editable install maps `gates` (what an escaping engine would reach), if that dir exists."""
    import importlib
    import site

    for sp in dict.fromkeys([*site.getsitepackages(), *sys.path]):
        for finder in sorted(Path(sp or ".").glob("__editable___*_finder.py")):
            found = getattr(importlib.import_module(finder.stem), "MAPPING", {}).get("gates")
            if found:
                return Path(found) if Path(found).is_dir() else None
    return None


def host_processes_mentioning(text: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if text.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    out.append(int(d))
            except OSError:
                pass
    return out


def beat_after(beat: Path, wait_s: float = 1.0) -> tuple[str, str]:
    first = beat.read_text()
    time.sleep(wait_s)
    return first, beat.read_text()


# ----- the escapes -------------------------------------------------------------------------------------------
def test_import_gates_fails_inside_and_the_report_says_how_it_ran():
    r = run_gate("m1_forward", ENGINES / "escape_import_gates", GateOptions(seed=1, timeout_s=300))
    assert r.verdict == "passed", r.message  # it answers with the correct base engine
    assert r.isolation["method"] == "bwrap" and any("no network" in g for g in r.isolation["guarantees"])
    assert "not sandboxed" not in "\n".join(r.summary_lines())
    esc = r.engine_metrics["engine probe forward"]["escape"]
    assert esc["escaped"] is False, esc
    assert all(v.startswith("ModuleNotFoundError") for v in esc["imports"].values()), esc["imports"]
    if (gates_dir := editable_gates_dir()) is None:  # else a missing dir inside proves nothing about the sandbox
        pytest.skip(NO_EDITABLE)
    assert esc["workspace_listing"][str(gates_dir)].startswith("FileNotFoundError"), esc["workspace_listing"]


def test_import_gates_control_without_the_sandbox_reaches_the_workspace():
    if (gates_dir := editable_gates_dir()) is None:
        pytest.skip(NO_EDITABLE)
    _, control = escape_probe("escape_import_gates", sandbox="off")
    assert control["escaped"] is True and control["imports"]["gates"] == f"imported from {gates_dir / '__init__.py'}"


def test_pth_hook_and_workspace_writes_are_refused_and_nothing_changes():
    w = Watched(reference=(), interpreter=watched_paths().interpreter)  # gates/ may change meanwhile: a working tree
    before = fingerprint(w)
    esc: dict = {}
    try:
        g, esc = escape_probe("escape_pth_hook")
        assert g.report.isolation["method"] == "bwrap"
        targets = {Path(t): v for t, v in esc["detail"].items()}
        system = [t for t in targets if t.parent in w.interpreter and "/.local/" not in str(t)]
        workspace = [t for t in targets if t.name == ".forge_escape_pth_hook"]  # where the editable install points
        assert system and workspace, esc["detail"]
        for t in system + workspace:
            if t.is_relative_to("/tmp") and targets[t] == "written":
                continue  # a workspace cloned under /tmp: the sandbox's /tmp is its own empty tmpfs (checked below)
            assert "errno 30" in targets[t], (t, targets[t])  # EROFS: read-only file system
        for t in targets:  # the user site-packages write went to the sandbox's private HOME, if anywhere
            assert not t.exists(), f"{t} reached the host"
        assert changes(before, fingerprint(w)) == []
    finally:  # a hole in the sandbox must not leave the (comment-only) files behind
        for t in [*esc.get("detail", {}), *(d / "zz_forge_escape_pth_hook.pth" for d in w.interpreter),
                  WORKSPACE / ".forge_escape_pth_hook"]:
            if Path(t).is_file() and "forge red-team escape_pth_hook" in Path(t).read_text():
                Path(t).unlink()


READ_ENVIRON = """
import json, os, sys
os.environ["FORGE_TEST_GATE_PID"] = str(os.getpid())
sys.path.insert(0, {tests!r})
from test_sandbox import escape_probe
g, esc = escape_probe("escape_read_environ", sandbox=sys.argv[1])
print(json.dumps(esc | {{"gate_pid": os.getpid(), "isolation": g.report.isolation["method"]}}))
"""


@pytest.mark.parametrize("sandbox", ["required", "off"])
def test_gate_environment_is_out_of_reach(sandbox):
    """The gate runs in a child process started with the secret in its initial environment (what
    /proc/<pid>/environ shows); without the sandbox the engine reads it there, in it the gate is invisible."""
    env = os.environ | {"FORGE_TEST_SECRET_TOKEN": "not-a-real-secret-4711", "PYTHONDONTWRITEBYTECODE": "1"}
    code = READ_ENVIRON.format(tests=str(Path(__file__).parent))
    p = subprocess.run([sys.executable, "-c", code, sandbox], env=env, capture_output=True, text=True, timeout=300,
                       cwd=WORKSPACE)
    assert p.returncode == 0, p.stderr[-3000:]
    esc = json.loads(p.stdout.strip().splitlines()[-1])
    gate = esc["gate_pid"]
    if sandbox == "off":
        assert esc["isolation"] == "none" and f"/proc/{gate}/environ" in esc["found"], esc
        return
    assert esc["isolation"] == "bwrap"
    assert esc["found"] == [] and esc["escaped"] is False, esc
    assert gate not in esc["pids"] and esc["gate_environ"].startswith("FileNotFoundError"), esc
    assert len(esc["pids"]) <= 4, esc["pids"]  # bwrap's init, the engine, and what it runs


def _non_loopback_ipv4() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_network_is_loopback_only(monkeypatch):
    with socket.create_server(("0.0.0.0", 0)) as srv:
        port = srv.getsockname()[1]
        ip = _non_loopback_ipv4()
        outside = f"{ip}:{port}" if ip else None
        if outside:
            monkeypatch.setenv("FORGE_TEST_CONNECT", outside)
        monkeypatch.setenv("FORGE_TEST_CONNECT_LOOPBACK", f"127.0.0.1:{port}")
        _, esc = escape_probe("escape_network")
        assert esc["escaped"] is False and all(v != "connected" for v in esc["detail"].values()), esc
        assert esc["own_loopback"] == "connected", esc  # torchrun's rendezvous on 127.0.0.1 still works
        assert f"127.0.0.1:{port}" in esc["detail"], esc
        if outside is None:
            pytest.skip("this machine has no non-loopback IPv4 address for the control run")
        _, control = escape_probe("escape_network", sandbox="off")
        assert control["detail"][outside] == "connected", control


def test_daemonized_child_dies_with_the_command(private_cache):
    g, esc = escape_probe("escape_orphan")
    beat = Path(esc["beat"])
    assert beat == Path(engine_cache_env(g.engine)["XDG_CACHE_HOME"]) / "escape_orphan.beat"
    assert esc["first_beat"], "the daemon never ran"
    first, later = beat_after(beat)
    assert first == later, "the daemon outlived the command"
    assert host_processes_mentioning(str(beat)) == []


def test_without_the_sandbox_the_daemon_survives(private_cache):
    """The control: the same engine unsandboxed leaves a live daemon (ended here by its pid)."""
    _, esc = escape_probe("escape_orphan", sandbox="off")
    beat = Path(esc["beat"])
    try:
        first, later = beat_after(beat)
        assert first != later
    finally:
        for pid in host_processes_mentioning(str(beat)):
            os.kill(pid, 9)


def test_timeout_kills_the_whole_sandbox(private_cache, monkeypatch):
    monkeypatch.setenv("FORGE_TEST_ORPHAN_HANG", "1")
    g = GateRun("m1_forward", discover_engine(ENGINES / "escape_orphan"), GateOptions(seed=1, timeout_s=10))
    try:
        case = g.make_case()
        with pytest.raises(GateTimeout):
            g.engine_probe("forward", case, keep=True)
        assert g.report.commands[-1].timed_out
        boxes = [str(d) for d in g._tmp if d.name.startswith("forge-engine-")]
        beat = Path(engine_cache_env(g.engine)["XDG_CACHE_HOME"]) / "escape_orphan.beat"
        assert beat.read_text(), "the daemon never ran"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(host_processes_mentioning(t) for t in [str(beat), *boxes]):
            time.sleep(0.1)
        assert [host_processes_mentioning(t) for t in [str(beat), *boxes]] == [[]] * (1 + len(boxes))
        first, later = beat_after(beat)
        assert first == later
    finally:
        g.cleanup()


# ----- what the sandbox shows and lets through -----------------------------------------------------------------
def test_filesystem_view(tmp_path, monkeypatch):
    """Workspace and reference cache (even inside the engine's own tree) empty, HOME fresh, / read-only, only
    the sandbox directory and the engine's cache writable."""
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".netrc").write_text("machine example.com password not-a-real-one\n")
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "planted.txt").write_text("the host's /tmp\n")
    eng = tmp_path / "eng"
    refcache = eng / "refcache"
    (refcache / "torch-forward-0123").mkdir(parents=True)
    body = f"""
        import json, os, sys
        def ls(p):
            try:
                return sorted(os.listdir(p))
            except OSError as e:
                return type(e).__name__
        def write(p):
            try:
                open(p, "a").close()
                return "written"
            except OSError as e:
                return e.errno
        seen = {{"workspace": ls({str(WORKSPACE)!r}), "refcache": ls({str(refcache)!r}), "home": ls(os.environ["HOME"]),
                "host_tmp": ls({str(tmp_path)!r}), "write_prefix": write(os.path.join(sys.prefix, "zz-forge-test")),
                "write_workspace": write({str(WORKSPACE / "zz-forge-test")!r}),
                "write_engine": write(os.path.join(os.path.dirname(__file__), "zz-forge-test")),
                "write_cache": write(os.path.join(os.environ["XDG_CACHE_HOME"], "zz-forge-test")),
                "write_home": write(os.path.join(os.environ["HOME"], "zz-forge-test"))}}
        json.dump(seen, open("seen.json", "w"))
    """
    fake_engine(eng, body)
    try:
        g, box = run_fake(eng, reference_cache=refcache)
        seen = json.loads((box / "seen.json").read_text())
        g.cleanup()
    finally:  # a hole in the sandbox must not leave the empty probe files behind
        for leftover in (Path(sys.prefix) / "zz-forge-test", WORKSPACE / "zz-forge-test"):
            if leftover.is_file() and leftover.stat().st_size == 0:
                leftover.unlink()
    assert seen["workspace"] in ([], "FileNotFoundError") and seen["refcache"] == [], seen  # nothing of either
    assert ".netrc" not in seen["home"] and ".config" not in seen["home"], seen
    assert "planted.txt" not in seen["host_tmp"] and "eng" in seen["host_tmp"], seen  # only what is bound back
    assert (seen["write_prefix"], seen["write_engine"]) == (30, 30), seen  # EROFS
    assert seen["write_workspace"] in (30, 2), seen  # read-only and empty, or not there at all (a checkout in /tmp)
    assert (seen["write_cache"], seen["write_home"]) == ("written", "written"), seen
    assert not (home / "zz-forge-test").exists()  # HOME inside was a fresh tmpfs


@pytest.mark.parametrize("sandbox, writes", [("required", 30), ("off", "written")])  # 30: EROFS
def test_the_case_is_read_only_inside_and_a_copy_outside(tmp_path, sandbox, writes):
    """Under bubblewrap the engine reads the gate's own case files through a read-only bind (no copy: an 8B-shaped
    case is 10 GB); unsandboxed it gets a copy. Either way the gate's case is what it was."""
    eng = fake_engine(tmp_path / "eng", """
        import json, os, sys
        case = sys.argv[sys.argv.index("--case") + 1]
        def write(p):
            try:
                with open(p, "ab") as f:
                    f.write(b"tampered")
                return "written"
            except OSError as e:
                return e.errno
        seen = {"files": sorted(os.listdir(case)), "weights": write(os.path.join(case, "weights.safetensors")),
                "new": write(os.path.join(case, "planted"))}
        json.dump(seen, open("seen.json", "w"))
    """)
    g = GateRun("m1_forward", discover_engine(eng), GateOptions(seed=1, timeout_s=180, sandbox=sandbox))
    try:
        case = g.make_case()
        before = (case.dir / "weights.safetensors").read_bytes()
        box = g.sandbox(case.dir)
        g.run_engine(["probe", "forward", "--case", str(box.case), "--out", str(box.out)], box, "engine probe forward")
        seen = json.loads((box.root / "seen.json").read_text())
        assert seen["files"] == ["batches.safetensors", "case.json", "weights.safetensors"], seen
        assert (seen["weights"], seen["new"]) == (writes, writes), seen
        assert (case.dir / "weights.safetensors").read_bytes() == before and not (case.dir / "planted").exists()
        assert g.report.isolation["method"] == ("bwrap" if sandbox == "required" else "none")
    finally:
        g.cleanup()


def test_torchrun_rendezvous_works_inside(tmp_path):
    eng = fake_engine(tmp_path / "eng", """
        import torch, torch.distributed as dist
        dist.init_process_group("gloo")
        t = torch.ones(1) * (dist.get_rank() + 1)
        dist.all_reduce(t)
        open(f"rank{dist.get_rank()}.txt", "w").write(str(t.item()))
        dist.destroy_process_group()
    """)
    g, box = run_fake(eng, nproc=2)
    try:
        assert g.report.isolation["method"] == "bwrap"
        assert [(box / f"rank{r}.txt").read_text() for r in (0, 1)] == ["3.0", "3.0"]
        assert g.report.commands[-1].argv[1:3] == ["-m", "torch.distributed.run"]  # the engine's argv, not bwrap's
    finally:
        g.cleanup()


def test_symlink_out_of_the_sandbox_fails_the_gate(tmp_path):
    """The gate reads the engine's outputs from the host: a symlink there must not lead it elsewhere."""
    secret = tmp_path / "elsewhere.safetensors"
    secret.write_bytes(b"{}")
    eng = fake_engine(tmp_path / "eng", f"""
        import os, sys
        out = sys.argv[sys.argv.index("--out") + 1]
        os.makedirs(out)
        os.symlink({str(secret)!r}, os.path.join(out, "tensors.safetensors"))
    """)
    r = run_gate("m1_forward", eng, GateOptions(seed=1, timeout_s=120))
    assert r.verdict == "failed" and "lead outside" in r.message and str(secret) in r.message, r.message


# ----- tampering and a missing sandbox --------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["reference", "interpreter"])
def test_tampering_is_a_failed_verdict_naming_the_file(tmp_path, monkeypatch, where):
    ref, sp = tmp_path / "gates", tmp_path / "site-packages"
    (ref / "stacks").mkdir(parents=True)
    (ref / "stacks" / "torch_ref.py").write_text("def forward(): ...\n")
    sp.mkdir()
    (sp / "torch.py").write_text("# a package\n")
    monkeypatch.setattr("gates.sandbox.watched_paths", lambda: Watched(reference=(ref,), interpreter=(sp,)))
    victim = ref / "stacks" / "torch_ref.py" if where == "reference" else sp / "torch.py"
    monkeypatch.setenv("FORGE_TEST_TAMPER", str(victim))
    eng = fake_engine(tmp_path / "eng", """
        import os
        with open(os.environ["FORGE_TEST_TAMPER"], "a") as f:
            f.write("import evil\\n")
    """)
    r = run_gate("m1_forward", eng, GateOptions(seed=1, timeout_s=120, sandbox="off"))
    assert r.verdict == "failed" and f"changed {victim}" in r.message, r.message
    assert r.localization is not None and str(victim) in r.localization.what
    assert r.isolation == {"method": "none", "reason": "sandbox off (GateOptions.sandbox / --sandbox off)"}
    assert r.summary_lines()[0].endswith("not sandboxed")
    assert [c.role for c in r.commands] == ["engine probe forward"]


def test_a_new_pth_file_is_tampering(tmp_path, monkeypatch):
    sp = tmp_path / "site-packages"
    sp.mkdir()
    monkeypatch.setattr("gates.sandbox.watched_paths", lambda: Watched(reference=(), interpreter=(sp,)))
    monkeypatch.setenv("FORGE_TEST_TAMPER", str(sp / "hook.pth"))
    eng = fake_engine(tmp_path / "eng", """
        import os
        open(os.environ["FORGE_TEST_TAMPER"], "w").write("import evil\\n")
    """)
    r = run_gate("m1_forward", eng, GateOptions(seed=1, timeout_s=120, sandbox="off"))
    assert r.verdict == "failed" and f"added {sp / 'hook.pth'}" in r.message, r.message


def test_required_sandbox_missing_is_an_error_and_preferred_runs_unsandboxed(tmp_path, monkeypatch):
    monkeypatch.setattr("gates.sandbox.find_bwrap", lambda: None)
    eng = fake_engine(tmp_path / "eng", "raise SystemExit(3)")
    r = run_gate("m1_forward", eng, GateOptions(seed=1, timeout_s=120))
    assert (r.verdict, r.error_type) == ("error", "sandbox"), r.message
    assert "\n" not in r.message and "apt-get install bubblewrap" in r.message and "--sandbox preferred" in r.message
    assert r.commands == [] and r.isolation["method"] == "none"
    r = run_gate("m1_forward", eng, GateOptions(seed=1, timeout_s=120, sandbox="preferred"))
    assert (r.verdict, r.error_type) == ("error", "engine_crash") and len(r.commands) == 1
    assert r.isolation == {"method": "none", "reason": "bwrap (bubblewrap) not found on PATH"}
    assert "not sandboxed" in r.summary_lines()[0]


def test_bwrap_is_used_here():
    """CI installs bubblewrap (.ci/run): a machine where it cannot run must say so, not skip the tests above."""
    iso = isolation("required")
    assert iso.method == "bwrap", iso.reason


def test_the_reference_runs_from_a_frozen_copy_of_gates():
    """The reference's gates/ is a read-only copy taken once per process: the tripwire hashes that copy, so an
    edit to the working tree during a run is no tampering, and the reference never sees it."""
    from gates.launch import reference_env, reference_tree

    root = reference_tree()
    assert reference_env()["PYTHONPATH"] == str(root) and watched_paths().reference == (root / "gates",)
    for src in (WORKSPACE / "gates").rglob("*.py"):
        copy = root / "gates" / src.relative_to(WORKSPACE / "gates")
        if not copy.exists():  # written to the working tree after the copy was taken
            assert src.stat().st_mtime > root.stat().st_mtime, src
            continue
        assert copy.read_bytes() == src.read_bytes() or src.stat().st_mtime > copy.stat().st_mtime, src
        assert copy.stat().st_mode & 0o222 == 0, copy  # read-only
    assert not (root / "gates" / "__pycache__").exists() and reference_tree() is root


def test_threads_share_one_reference_tree():
    """Gate runs in threads (the red-team session runs two at a time) must fingerprint one tree: a second copy made by
    a racing first use would read as the first one's files all removed (tampering)."""
    code = ("import threading; from gates import launch; b = threading.Barrier(8); roots = []\n"
            "def f():\n    b.wait(); roots.append(launch.reference_tree())\n"
            "ts = [threading.Thread(target=f) for _ in range(8)]; [t.start() for t in ts]; [t.join() for t in ts]\n"
            "print(len(roots), len(set(roots)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=WORKSPACE)
    assert out.stdout.split() == ["8", "1"], out.stdout + out.stderr


def test_bytecode_caching_is_not_tampering_but_a_foreign_pyc_is(tmp_path):
    """Python writing the .pyc of a module it imports is no tampering; a .pyc whose code is not its source's is."""
    import py_compile

    from gates.sandbox import tampering

    sp = tmp_path / "site-packages"
    (sp / "pkg").mkdir(parents=True)
    src = sp / "pkg" / "mod.py"
    src.write_text("def f():\n    return 1\n")
    w = Watched(reference=(), interpreter=(sp,))
    before = fingerprint(w)
    pyc = Path(py_compile.compile(str(src), doraise=True))
    assert pyc.parent.name == "__pycache__" and tampering(before, fingerprint(w)) == []
    evil = tmp_path / "evil.py"
    evil.write_text("def f():\n    return 2\n")
    data = Path(py_compile.compile(str(evil), cfile=str(tmp_path / "evil.pyc"), doraise=True)).read_bytes()
    pyc.write_bytes(pyc.read_bytes()[:16] + data[16:])  # the source's header, foreign code
    assert tampering(before, fingerprint(w)) == [f"added {pyc}"]
