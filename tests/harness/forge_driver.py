"""A forge run in its own process (the kill -9 and signal tests): the toy spec, the shell backend, the fake gate.

    python forge_driver.py ENGINE STATE AGENT_SCRIPT CTRL_DIR [--resume] [--sandbox MODE]

The round sandbox is off unless --sandbox says otherwise (the agent then writes its markers to CTRL).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from forge_toy import fake_gate, toy_spec, write_spec_file  # noqa: E402

from harness.loop import ForgeLoop  # noqa: E402


def main() -> int:
    engine, state, script, ctrl = (Path(a) for a in sys.argv[1:5])
    sandbox = sys.argv[sys.argv.index("--sandbox") + 1] if "--sandbox" in sys.argv else "off"
    spec = toy_spec(engine, stages=("m1", "m2"), rounds=4,
                    agent={"backend": "shell", "options": {"command": f"bash {script}"}, "env": {"CTRL": str(ctrl)},
                           "sandbox": sandbox, "share": [str(script), str(ctrl)]})
    spec_file = state.parent / "toy.toml"
    if not spec_file.exists():
        write_spec_file(spec_file)
    out = ForgeLoop(spec, spec_file, engine=engine, state_dir=state, gate_fn=fake_gate).run(resume="--resume" in sys.argv)
    print(f"STATUS {out.status}", flush=True)
    return 0 if out.ok else (128 + out.signum if out.signum else 1)


if __name__ == "__main__":
    sys.exit(main())
