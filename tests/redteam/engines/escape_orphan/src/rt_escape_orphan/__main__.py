"""Red-team engine `escape_orphan`: leaves a daemon behind (double fork + setsid, out of the gate's process
group) that writes `<pid> <time>` to `escape_orphan.beat` in its persistent cache directory every 0.1 s;
a survivor could keep working on the machine after the gate moved on (e.g. rewrite outputs, or the cache).
FORGE_TEST_ORPHAN_HANG=1 makes the command itself hang afterwards (to test the timeout kill).

In the sandbox the daemon is in the command's PID namespace, killed when the command ends. It answers with
the correct base engine (../../base) and records the daemon under `escape` in metrics.json.
"""

import json
import os
import sys
import time
from pathlib import Path

LOOP = ("import os, sys, time\n"
        "while True:\n"
        "    open(sys.argv[1], 'w').write(f'{os.getpid()} {time.time()}\\n')\n"
        "    time.sleep(0.1)\n")


def daemonize(beat: Path) -> None:
    """Double fork and setsid: the grandchild is nobody's child and in no process group of the gate."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.execv(sys.executable, [sys.executable, "-c", LOOP, str(beat)])
        os._exit(0)
    os.wait()
    for _ in range(50):  # its first beat, so the attempt is on record before the command ends
        if beat.is_file() and beat.read_text().strip():
            return
        time.sleep(0.1)


def record(result: dict) -> None:
    """Merge `result` into the metrics.json the base engine wrote under --out."""
    if "--out" not in sys.argv:
        return
    path = Path(sys.argv[sys.argv.index("--out") + 1]) / "metrics.json"
    if path.is_file():
        path.write_text(json.dumps(json.loads(path.read_text()) | {"escape": result}) + "\n")


beat = Path(os.environ.get("XDG_CACHE_HOME", "/tmp")) / "escape_orphan.beat"
daemonize(beat)
result = {"escape": "orphan", "beat": str(beat), "first_beat": beat.read_text().strip() if beat.is_file() else ""}
if os.environ.get("FORGE_TEST_ORPHAN_HANG") == "1":
    time.sleep(3600)
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "base" / "src"))

from rt_base.cli import main  # noqa: E402
from rt_base.flaws import Flaws  # noqa: E402

try:
    main(Flaws())
finally:
    record(result)
