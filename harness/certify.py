"""Certify an engine: run a spec's gate stages on one committed revision of it and record them in its
manifest.json, through the loop's own recorder (`harness.manifest.record_gates`, writer `certify`).

The gates judge the engine as committed at `rev` (a copy from `git archive`, never the working tree, so the
manifest's `commit` names the code that was judged). Stages run in the spec's order and stop at the first one
whose gates are not accepted (the spec's `allow_unsupported` decides, as in a forge round); the stages accepted
before it are recorded. Ops stages are elections between candidates, not proofs: they are skipped. The manifest
and the accepted gates' reports (`forge/reports/`) are written into the engine folder for the user to commit.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import git

from harness import manifest as mf
from harness.gating import GateFn, GateOutcome, run_real_gate
from harness.inspection import NotAnEngine, engine_package
from harness.secrets import redact_bytes
from harness.spec import ForgeSpec, GateCheck, StageSpec, spec_sha256


class CertifyError(RuntimeError):
    """Certify cannot start: not a git checkout, an unknown revision or stage, no gate stage to run."""


@dataclass
class StageRun:
    stage: str
    results: list[tuple[GateCheck, GateOutcome]]

    @property
    def accepted(self) -> bool:
        return bool(self.results) and all(out.accepted(g) for g, out in self.results)


@dataclass
class Certification:
    engine: Path
    rev: str                                   # the commit whose engine code the gates judged
    stages: list[StageRun] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # ops stages: elections, not proofs
    manifest: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # engine-relative path -> bytes, as written

    @property
    def recorded(self) -> list[str]:
        return [s.stage for s in self.stages if s.accepted]

    @property
    def passed(self) -> bool:
        return bool(self.stages) and all(s.accepted for s in self.stages)


def committed_engine(engine: Path, rev: str, dest: Path) -> tuple[str, Path]:
    """(the full commit sha of `rev`, a copy of `engine` as committed there, under `dest`)."""
    try:
        repo = git.Repo(engine, search_parent_directories=True)
        sha = repo.git.rev_parse("--verify", f"{rev}^{{commit}}")
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise CertifyError(f"{engine} is not inside a git repository: certify judges a commit") from None
    except git.GitCommandError:
        raise CertifyError(f"unknown revision {rev!r}") from None
    rel = engine.resolve().relative_to(Path(repo.working_tree_dir).resolve()).as_posix()
    try:
        tar = repo.git.archive("--format=tar", f"{sha}:{rel}" if rel != "." else sha, as_process=False,
                               stdout_as_string=False)
    except git.GitCommandError:
        raise CertifyError(f"{rel} is not in commit {sha[:10]}") from None
    out = dest / engine.name
    out.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(out, filter="data")
    return sha, out


def gate_stages(spec: ForgeSpec, only: list[str] | None) -> tuple[list[StageSpec], list[str]]:
    """(the gate stages to run, in the spec's order; the ops stages left out). Unknown names in `only` refuse."""
    names = [s.name for s in spec.stages]
    unknown = [n for n in only or [] if n not in names]
    if unknown:
        raise CertifyError(f"unknown stage(s) {', '.join(unknown)}; the spec's stages: {', '.join(names)}")
    chosen = [s for s in spec.stages if not only or s.name in only]
    run = [s for s in chosen if s.kind == "gates"]
    if not run:
        raise CertifyError("no gate stage to run (ops stages are elections, not proofs)")
    return run, [s.name for s in chosen if s.kind != "gates"]


def certify(spec: ForgeSpec, spec_path: Path, engine: Path, *, rev: str = "HEAD", only: list[str] | None = None,
            out_dir: Path, gate_fn: GateFn = run_real_gate,
            on_gate: Callable[[str, GateCheck, GateOutcome], None] = lambda stage, gate, out: None) -> Certification:
    """Run the gate stages on `engine` at `rev`; record the accepted ones into `engine`/manifest.json."""
    engine = engine.resolve()
    try:
        engine_package(engine)
    except NotAnEngine as e:
        raise CertifyError(str(e)) from None
    stages, skipped = gate_stages(spec, only)
    with tempfile.TemporaryDirectory(prefix="forge-certify-") as tmp:
        sha, judged = committed_engine(engine, rev, Path(tmp))
        cert = Certification(engine, sha, skipped=skipped)
        for stage in stages:
            run = StageRun(stage.name, [])
            cert.stages.append(run)
            for i, gate in enumerate(stage.gates):
                out = gate_fn(gate, judged, spec, out_dir / stage.name / f"{i:02d}-{gate.name}")
                run.results.append((gate, out))
                on_gate(stage.name, gate, out)
                if not out.accepted(gate):
                    break
            if not run.accepted:
                break
    m = mf.load((engine / mf.MANIFEST).read_bytes() if (engine / mf.MANIFEST).is_file() else None)
    hardware = mf.hardware_info()
    for run in cert.stages:
        if not run.accepted:
            continue
        m, files = mf.record_gates(m, spec=spec, spec_path=str(spec_path), spec_sha256=spec_sha256(spec_path),
                                   engine_name=engine.name, stage=run.stage, round_no=None, commit=sha,
                                   results=run.results, hardware=hardware, writer="certify")
        cert.files |= files
    if cert.recorded:
        cert.files[mf.MANIFEST] = mf.dumps(m)
        cert.manifest = m
        for rel, data in cert.files.items():  # redacted, as the loop's commits are
            (engine / rel).parent.mkdir(parents=True, exist_ok=True)
            (engine / rel).write_bytes(redact_bytes(data))
    return cert
