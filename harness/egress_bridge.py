"""Runs inside a round's sandbox (stdlib only; harness/egress.py binds it there):

    python egress_bridge.py PORT SOCKET -- ARGV...

listens on 127.0.0.1:PORT in the sandbox's own network, relays every connection to the Unix socket SOCKET
(the harness's egress proxy, outside), and runs ARGV as its child; exits with ARGV's status.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading


def relay(a: socket.socket, b: socket.socket) -> None:
    """Copy a -> b until a closes, then half-close b."""
    try:
        while chunk := a.recv(65536):
            b.sendall(chunk)
    except OSError:
        pass
    finally:
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def pipe_both(a: socket.socket, b: socket.socket) -> None:
    """Relay both ways until both sides close."""
    t = threading.Thread(target=relay, args=(b, a), daemon=True)
    t.start()
    relay(a, b)
    t.join()
    a.close()
    b.close()


def _forward(conn: socket.socket, path: str) -> None:
    up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        up.connect(path)
    except OSError:
        conn.close()
        return
    pipe_both(conn, up)


def main(argv: list[str]) -> int:
    port, path, sep, *cmd = argv
    if sep != "--" or not cmd:
        print("usage: egress_bridge.py PORT SOCKET -- ARGV...", file=sys.stderr)
        return 2
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", int(port)))
    server.listen(64)

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=_forward, args=(conn, path), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    child = subprocess.Popen(cmd)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda signum, frame: child.send_signal(signum))
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
