"""Red-team engine `escape_import_gates`: imports the workspace's `gates` (the reference stacks) through the
editable install's finder, which would let it answer every probe with the reference's own code.

In the sandbox the workspace is an empty tmpfs, so the import fails. It answers with the correct base engine
(../../base) and records the attempt under `escape` in metrics.json; tests/gates/test_sandbox.py reads it.
"""

import importlib
import json
import os
import site
import sys
from pathlib import Path


def attempt() -> dict:
    imports: dict[str, str] = {}
    for name in ("gates", "gates.stacks", "harness"):
        try:
            mod = importlib.import_module(name)
            imports[name] = f"imported from {getattr(mod, '__file__', None) or list(getattr(mod, '__path__', []))}"
        except ImportError as e:
            imports[name] = f"{type(e).__name__}: {e}"
    listings: dict[str, list[str] | str] = {}
    # where the editable finder says the workspace is, and what is there: in any package dir on the path
    for sp in dict.fromkeys([*site.getsitepackages(), *sys.path]):
        for finder in sorted(Path(sp or ".").glob("__editable___*_finder.py")):
            try:
                mapping = importlib.import_module(finder.stem).MAPPING
            except Exception as e:  # noqa: BLE001 - recorded
                listings[finder.stem] = f"{type(e).__name__}: {e}"
                continue
            for path in mapping.values():
                try:
                    listings[path] = sorted(os.listdir(path))
                except OSError as e:
                    listings[path] = f"{type(e).__name__}: {e}"
    escaped = any(v.startswith("imported") for v in imports.values()) or any(
        isinstance(v, list) and v for v in listings.values())
    return {"escape": "import_gates", "escaped": escaped, "imports": imports, "workspace_listing": listings}


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
