"""Red-team engine `escape_pth_hook`: writes a `.pth` file into the interpreter's site-packages (system and
user) and a file into the workspace. A real `.pth` hook runs at every later interpreter start, so the next
reference run would execute the engine's code.

In the sandbox / is read-only and the workspace an empty read-only tmpfs: every write is refused (the user
site-packages lies in the sandbox's private HOME, gone when the command ends). What it writes is a comment
only, harmless if a hole let it through. It answers with the correct base engine (../../base) and records
the attempts under `escape` in metrics.json; tests/gates/test_sandbox.py reads them and checks the host.
"""

import importlib
import json
import site
import sys
from pathlib import Path

NAME = "zz_forge_escape_pth_hook.pth"
MARK = "# forge red-team escape_pth_hook: a real hook would put an `import` line here\n"


def site_dirs() -> list[str]:
    """Its own site-packages and every package dir on its path (the shared interpreter's, where it has one)."""
    on_path = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    return list(dict.fromkeys([*site.getsitepackages(), *on_path]))


def targets() -> list[Path]:
    out = [Path(sp) / NAME for sp in site_dirs()] + [Path(site.getusersitepackages()) / NAME]
    for sp in site_dirs():  # the workspace, found through the editable install's finder
        for finder in sorted(Path(sp).glob("__editable___*_finder.py")):
            try:
                mapping = importlib.import_module(finder.stem).MAPPING
            except Exception:  # noqa: BLE001 - then there is no workspace to aim at
                continue
            out += [Path(p).parent / ".forge_escape_pth_hook" for p in mapping.values()]
    return list(dict.fromkeys(out))


def attempt() -> dict:
    detail: dict[str, str] = {}
    for t in targets():
        try:
            t.parent.mkdir(parents=True, exist_ok=True)
            with open(t, "a") as f:
                f.write(MARK)
            detail[str(t)] = "written"
        except OSError as e:
            detail[str(t)] = f"{type(e).__name__}: [errno {e.errno}] {e.strerror}"
    return {"escape": "pth_hook", "escaped": any(v == "written" for v in detail.values()), "detail": detail}


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
