"""manifest.json: what an engine has proven. Written by the harness only: on every passing forge round, and by
`certify` (the stage's gates run on a revision of the engine, no agent).

    {
      "engine": "train_engine_0.5B",
      "spec": {"name", "path", "sha256", "model", "reference", "hardware"},
      "gates": {"m1_forward": {"verdict", "metrics", "time_s", "stage", "round", "commit", "hardware",
                               "reference", "case", "dtype", "world_size", "tp", "policy", "report", "by", "at",
                               "unsupported": {part: the gate's reason} (parts the spec accepted unsupported)}},
      "ops": {"rmsnorm": {"metric", "value", "baseline", "commit", "round"}},
      "hardware": where the newest gates ran,
      "forge": {"run_id", "branch", "backend", "updated"} (the forge run that recorded gates last, if one did),
      "commit": the newest commit whose code the gates judged
    }

`commit` fields name the commit holding the judged code; the manifest itself lands in the commit right
after it (a manifest cannot name the commit that contains it). Keys written by others are kept.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Literal

from harness import launcher
from harness.gating import GateOutcome, unsupported_parts
from harness.prompts import WORKSPACE_ROOT
from harness.spec import ForgeSpec, GateCheck

MANIFEST = "manifest.json"
REPORTS = "forge/reports"  # the accepted gates' reports, beside the manifest in the engine's tree


def hardware_info() -> dict[str, Any]:
    """Where the gates ran: host CPU and, when there is one, the GPU (from nvidia-smi; no torch import)."""
    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(), "cpu": platform.processor()
                            or platform.machine(), "python": platform.python_version()}
    try:
        out = launcher.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], timeout_s=20)
        gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.ok else []
    except OSError:  # no nvidia-smi: no GPU
        gpus = []
    info["gpus"] = gpus
    info["gpu"] = gpus[0] if gpus else None
    return info


def portable_path(path: str) -> str:
    """`path` relative to the workspace root when it lies inside it (the manifest ships in the repository: an absolute
    path names the machine that wrote it), else as given."""
    try:
        return Path(path).resolve().relative_to(WORKSPACE_ROOT).as_posix()
    except ValueError:
        return path


def load(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def record_gates(manifest: dict[str, Any], *, spec: ForgeSpec, spec_path: str, spec_sha256: str, engine_name: str,
                 stage: str, round_no: int | None, commit: str, results: list[tuple[GateCheck, GateOutcome]],
                 hardware: dict[str, Any], writer: Literal["forge", "certify"],
                 run: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest with these gate results (accepted ones only) merged in, and the files that travel with it into
    the engine's tree (`forge/reports/<gate>.json`, which the manifest's `report` fields then name).

    `writer` is who judged (`forge`: a forge run's round; `certify`: `bash agent-loop.sh certify`), recorded in each
    gate's `by`; a forge round also names its run (`run`: run id, branch, backend), where its history lies."""
    m = dict(manifest)
    m["engine"] = engine_name
    m["spec"] = {"name": spec.name, "path": portable_path(spec_path), "sha256": spec_sha256, "model": spec.model.preset,
                 "reference": spec.reference, "hardware": spec.hardware.model_dump()}
    gates = dict(m.get("gates") or {})
    files: dict[str, bytes] = {}
    for gate, out in results:
        if not out.accepted(gate):
            continue
        report = str(out.report) if out.report else None
        if out.report and Path(out.report).is_file():
            report = f"{REPORTS}/{gate.name}.json"
            files[report] = Path(out.report).read_bytes()
        gates[gate.name] = {
            "verdict": out.verdict, "metrics": out.key_numbers(limit=40), "time_s": out.time_s, "stage": stage,
            "round": round_no, "commit": commit, "hardware": hardware, "reference": spec.reference,
            "case": gate.case, "dtype": gate.dtype, "world_size": gate.world_size, "tp": spec.hardware.tp,
            "policy": gate.policy,
            "report": report, "by": writer, "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "unsupported": unsupported_parts(out.report) if out.verdict == "unsupported" else {},
        }
    m["gates"] = gates
    m["hardware"] = hardware
    m["commit"] = commit
    if run is not None:
        m["forge"] = {**run, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return m, files


def record_op(manifest: dict[str, Any], *, op: str, metric: str, value: float, baseline: float | None, commit: str,
              round_no: int) -> dict[str, Any]:
    m = dict(manifest)
    ops = dict(m.get("ops") or {})
    ops[op] = {"metric": metric, "value": value, "baseline": baseline, "commit": commit, "round": round_no}
    m["ops"] = ops
    return m


def dumps(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode()
