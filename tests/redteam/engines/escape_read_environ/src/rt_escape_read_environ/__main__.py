"""Red-team engine `escape_read_environ`: reads the environment of every process it can see through
/proc/<pid>/environ (the gate's holds whatever credentials the gate was started with; the engine's own
environment is scrubbed of them), and /proc/<FORGE_TEST_GATE_PID>/environ when a test names the gate's pid.

In the sandbox it has its own PID namespace and /proc: the gate is not there. It answers with the correct
base engine (../../base) and records what it saw under `escape` in metrics.json.
"""

import json
import os
import sys
from pathlib import Path

SECRET = b"FORGE_TEST_SECRET_TOKEN="


def attempt() -> dict:
    pids = sorted(int(d) for d in os.listdir("/proc") if d.isdigit())
    found, readable = [], []
    for pid in pids:
        for what in ("environ", "cmdline"):
            try:
                data = Path(f"/proc/{pid}/{what}").read_bytes()
            except OSError:
                continue
            if what == "environ":
                readable.append(pid)
            if SECRET in data:
                found.append(f"/proc/{pid}/{what}")
    if any(k.encode() + b"=" == SECRET for k in os.environ):
        found.append("os.environ")
    gate = os.environ.get("FORGE_TEST_GATE_PID")
    gate_environ = "no pid given"
    if gate:
        try:
            data = Path(f"/proc/{gate}/environ").read_bytes()
            gate_environ = f"read {len(data)} bytes"
            if SECRET in data and f"/proc/{gate}/environ" not in found:
                found.append(f"/proc/{gate}/environ")
        except OSError as e:
            gate_environ = f"{type(e).__name__}: {e}"
    return {"escape": "read_environ", "escaped": bool(found), "found": found, "pids": pids,
            "readable_environ": readable, "gate_environ": gate_environ}


def record(result: dict) -> None:
    """Merge `result` into the metrics.json the base engine wrote under --out."""
    if "--out" not in sys.argv:
        return
    path = Path(sys.argv[sys.argv.index("--out") + 1]) / "metrics.json"
    if path.is_file():
        path.write_text(json.dumps(json.loads(path.read_text()) | {"escape": result}) + "\n")


result = attempt()
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "base" / "src"))

from rt_base.cli import main  # noqa: E402
from rt_base.flaws import Flaws  # noqa: E402

try:
    main(Flaws())
finally:
    record(result)
