"""Network for a sandboxed CLI agent: only the model API it needs.

A round's sandbox has loopback only. A CLI agent that talks to its service gets `HTTPS_PROXY` pointing at
a bridge inside the sandbox (harness/egress_bridge.py, 127.0.0.1:3128 in the sandbox's own network), which
relays each connection over a Unix socket bound into the sandbox to this proxy, outside it. The proxy opens
HTTP CONNECT tunnels to the allowed `host:port` pairs only (TLS goes through untouched: the agent talks to
its service, the harness sees only where); everything else gets 403. Every decision is logged.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

from harness.egress_bridge import pipe_both

BRIDGE = Path(__file__).with_name("egress_bridge.py")
INSIDE = Path("/run/forge")               # where the sandbox sees the bridge and the proxy's socket
BRIDGE_INSIDE = INSIDE / "bridge.py"
SOCKET_DIR_INSIDE = INSIDE / "egress"
PORT = 3128                               # the bridge's port in the sandbox's own network namespace
_HEAD_LIMIT = 16384


class EgressProxy:
    """An HTTP CONNECT proxy on a Unix socket, tunnelling only to `allow` ("host:port")."""

    def __init__(self, allow: list[str], log: Path | None = None) -> None:
        self.allow = {a.strip().lower() for a in allow}
        self.log = log
        self.dir = Path(tempfile.mkdtemp(prefix="forge-egress-"))
        self.socket_path = self.dir / "proxy.sock"
        self._server: socket.socket | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> "EgressProxy":
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.socket_path))
        self._server.listen(64)
        threading.Thread(target=self._serve, name="forge-egress", daemon=True).start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _serve(self) -> None:
        assert self._server is not None
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _note(self, line: str) -> None:
        if self.log is not None:
            with self._lock, open(self.log, "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    def _handle(self, conn: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < _HEAD_LIMIT:
                chunk = conn.recv(4096)
                if not chunk:
                    conn.close()
                    return
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, *_ = line.split(" ") + ["", ""]
            if method.upper() != "CONNECT" or target.lower() not in self.allow:
                self._note(f"denied {method} {target}")
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                conn.close()
                return
            host, _, port = target.rpartition(":")
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=30)
            upstream.settimeout(None)
        except (OSError, ValueError) as e:
            self._note(f"failed {head[:120]!r}: {e}")
            try:
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            except OSError:
                pass
            conn.close()
            return
        self._note(f"tunnel {target}")
        conn.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        rest = head.split(b"\r\n\r\n", 1)[1]
        if rest:
            upstream.sendall(rest)
        pipe_both(conn, upstream)


def proxy_env() -> dict[str, str]:
    """What tells a CLI agent (Node, Rust, Python clients alike) to use the bridge."""
    url = f"http://127.0.0.1:{PORT}"
    return {"HTTPS_PROXY": url, "https_proxy": url, "HTTP_PROXY": url, "http_proxy": url,
            "ALL_PROXY": url, "NO_PROXY": "", "no_proxy": ""}
