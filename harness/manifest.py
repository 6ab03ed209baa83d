"""manifest.json: what an engine has proven. Written by the harness only, on every passing round.

    {
      "engine": "train_engine_0.5B",
      "spec": {"name", "path", "sha256", "model", "reference", "hardware"},
      "gates": {"m1_forward": {"verdict", "metrics", "time_s", "stage", "round", "commit", "hardware",
                               "reference", "case", "dtype", "world_size", "policy", "report",
                               "unsupported": {part: the gate's reason} (parts the spec accepted unsupported)}},
      "ops": {"rmsnorm": {"metric", "value", "baseline", "commit", "round"}},
      "hardware": where the newest gates ran,
      "forge": {"run_id", "branch", "backend", "updated"},
      "commit": the newest commit whose code the gates judged
    }

`commit` fields name the commit holding the judged code; the manifest itself lands in the commit right
after it (a manifest cannot name the commit that contains it). Keys written by others are kept.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from typing import Any

from harness.gating import GateOutcome, unsupported_parts
from harness.spec import ForgeSpec, GateCheck

MANIFEST = "manifest.json"


def hardware_info() -> dict[str, Any]:
    """Where the gates ran: host CPU and, when there is one, the GPU (from nvidia-smi; no torch import)."""
    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(), "cpu": platform.processor()
                            or platform.machine(), "python": platform.python_version()}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        gpus = []
    info["gpus"] = gpus
    info["gpu"] = gpus[0] if gpus else None
    return info


def load(raw: bytes | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def record_gates(manifest: dict[str, Any], *, spec: ForgeSpec, spec_path: str, spec_sha256: str, engine_name: str,
                 stage: str, round_no: int, commit: str, results: list[tuple[GateCheck, GateOutcome]],
                 hardware: dict[str, Any], run_id: str, branch: str, backend: str) -> dict[str, Any]:
    """The manifest with this round's gate results (accepted ones only) merged in."""
    m = dict(manifest)
    m["engine"] = engine_name
    m["spec"] = {"name": spec.name, "path": spec_path, "sha256": spec_sha256, "model": spec.model.preset,
                 "reference": spec.reference, "hardware": spec.hardware.model_dump()}
    gates = dict(m.get("gates") or {})
    for gate, out in results:
        if not out.accepted(gate):
            continue
        gates[gate.name] = {
            "verdict": out.verdict, "metrics": out.key_numbers(limit=40), "time_s": out.time_s, "stage": stage,
            "round": round_no, "commit": commit, "hardware": hardware, "reference": spec.reference,
            "case": gate.case, "dtype": gate.dtype, "world_size": gate.world_size, "policy": gate.policy,
            "report": str(out.report) if out.report else None,
            "unsupported": unsupported_parts(out.report) if out.verdict == "unsupported" else {},
        }
    m["gates"] = gates
    m["hardware"] = hardware
    m["commit"] = commit
    m["forge"] = {"run_id": run_id, "branch": branch, "backend": backend, "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return m


def record_op(manifest: dict[str, Any], *, op: str, metric: str, value: float, baseline: float | None, commit: str,
              round_no: int) -> dict[str, Any]:
    m = dict(manifest)
    ops = dict(m.get("ops") or {})
    ops[op] = {"metric": metric, "value": value, "baseline": baseline, "commit": commit, "round": round_no}
    m["ops"] = ops
    return m


def dumps(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n").encode()
