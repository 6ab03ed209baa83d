"""A forge run in its own process, sealed as the CLI seals itself (the kill -9, signal and secrets tests): the toy
spec, the fake gate, and the shell backend running AGENT_SCRIPT (or the agent table given as JSON).

    python forge_driver.py ENGINE STATE AGENT_SCRIPT CTRL_DIR [--resume] [--sandbox MODE] [--agent JSON]
                           [--stages m1,m2]

The round sandbox is off unless --sandbox says otherwise (the agent then writes its markers to CTRL).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from forge_toy import fake_gate, toy_spec, write_spec_file  # noqa: E402

from harness.loop import ForgeLoop  # noqa: E402
from harness.secrets import seal  # noqa: E402


def _arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def main() -> int:
    seal()
    engine, state, script, ctrl = (Path(a) for a in sys.argv[1:5])
    agent = json.loads(_arg("--agent", "null")) or {
        "backend": "shell", "options": {"command": f"bash {script}"}, "env": {"CTRL": str(ctrl)},
        "sandbox": _arg("--sandbox", "off"), "share": [str(script), str(ctrl)]}
    spec = toy_spec(engine, stages=tuple(_arg("--stages", "m1,m2").split(",")), rounds=4, agent=agent)
    spec_file = state.parent / "toy.toml"
    if not spec_file.exists():
        write_spec_file(spec_file)
    out = ForgeLoop(spec, spec_file, engine=engine, state_dir=state, gate_fn=fake_gate).run(resume="--resume" in sys.argv)
    print(f"STATUS {out.status}", flush=True)
    return 0 if out.ok else (128 + out.signum if out.signum else 1)


if __name__ == "__main__":
    sys.exit(main())
