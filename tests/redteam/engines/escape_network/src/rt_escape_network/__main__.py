"""Red-team engine `escape_network`: opens TCP connections out of the machine (a public address, and
FORGE_TEST_CONNECT / FORGE_TEST_CONNECT_LOOPBACK, host:port of a server a test runs on the host), as an
engine fetching answers or leaking data would. It also checks that its own loopback works (torchrun's
rendezvous needs it).

In the sandbox it has a network namespace with loopback only: every outside connection fails. It answers
with the correct base engine (../../base) and records the attempts under `escape` in metrics.json.
"""

import json
import os
import socket
import sys
from pathlib import Path


def connect(addr: str) -> str:
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=3) as s:
            s.sendall(b"escape_network\n")
        return "connected"
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def attempt() -> dict:
    detail = {"1.1.1.1:443": connect("1.1.1.1:443")}
    for var in ("FORGE_TEST_CONNECT", "FORGE_TEST_CONNECT_LOOPBACK"):
        if os.environ.get(var):
            detail[os.environ[var]] = connect(os.environ[var])
    with socket.create_server(("127.0.0.1", 0)) as srv:  # the sandbox's own loopback
        loopback = connect(f"127.0.0.1:{srv.getsockname()[1]}")
    return {"escape": "network", "escaped": any(v == "connected" for v in detail.values()), "detail": detail,
            "own_loopback": loopback}


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
