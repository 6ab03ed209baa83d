"""The launcher: every end of a process kills its whole tree (a timeout, a normal exit that left a child behind,
`on_line` stopping it), also a descendant that moved to a session of its own; Ctrl-C is passed on to the child
when asked; a failing command says what failed; captured lines are cleaned and logged as they arrive."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from harness import launcher
from harness.procs import wait_gone


def _pids(text: str) -> list[int]:
    return [int(w) for w in text.split() if w.isdigit()]


def test_a_timeout_kills_the_whole_tree_also_a_new_session() -> None:
    done = launcher.run(["bash", "-c", "setsid sleep 300 & echo $!; sleep 300 & echo $!; wait"],
                        timeout_s=1.0, on_line=lambda line: None)
    assert done.timed_out and done.returncode is None and 0.9 < done.wall_s < 10
    pids = _pids(done.stdout)
    assert len(pids) == 2 and wait_gone(pids, 5.0)


def test_a_normal_exit_leaves_no_child_behind() -> None:
    done = launcher.run(["bash", "-c", "sleep 300 & echo $!; echo to-stderr >&2; exit 3"])
    assert (done.returncode, done.stderr, done.timed_out) == (3, "to-stderr\n", False)
    assert wait_gone(_pids(done.stdout), 5.0)


def test_on_line_stops_it_and_says_why() -> None:
    seen: list[str] = []
    done = launcher.run([sys.executable, "-u", "-c", "import time\nprint('ready')\ntime.sleep(300)"],
                        on_line=lambda line: seen.append(line) or ("saw ready" if "ready" in line else None))
    assert (done.stopped, done.returncode, seen) == ("saw ready", None, ["ready\n"])
    assert done.wall_s < 30


@pytest.fixture
def python_sigint():
    """Ctrl-C raises KeyboardInterrupt, as in a fresh interpreter, whatever handler an earlier test left."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_is_forwarded_and_the_childs_own_exit_awaited(python_sigint) -> None:
    child = ("import signal, sys, time\nsignal.signal(signal.SIGINT, lambda *a: sys.exit(7))\n"
             "print('ready', flush=True)\ntime.sleep(60)")

    def interrupt_us(line: str) -> None:
        if "ready" in line:
            os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C reaches only the harness's group

    done = launcher.run([sys.executable, "-c", child], on_line=interrupt_us, forward_interrupt=True)
    assert done.returncode == 7 and done.wall_s < 30


def test_a_failure_names_the_command_and_its_last_error_line() -> None:
    with pytest.raises(launcher.LaunchFailed, match=r"bash -c .* exited 2: no such thing"):
        launcher.run(["bash", "-c", "echo first >&2; echo no such thing >&2; exit 2"]).check()
    assert launcher.run(["true"]).check().ok


def _raw(path: Path) -> str:
    return path.read_bytes().decode()  # read_text would turn a \r into \n


def test_clean_and_logs_see_each_line_as_it_arrives(tmp_path: Path) -> None:
    logs = (tmp_path / "out.log", tmp_path / "err.log")
    seen: list[str] = []

    def on_line(line: str) -> None:
        seen.append(line if _raw(logs[0]).endswith(line) else "not yet logged")

    done = launcher.run(["bash", "-c", "echo secret-1; printf 'a\\rb\\n'; echo secret-2 >&2"], on_line=on_line,
                        clean=lambda line: line.replace("secret", "[hidden]"), logs=logs, lf_only=True)
    assert seen == ["[hidden]-1\n", "a\rb\n"] and done.stdout == _raw(logs[0]) == "".join(seen)
    assert done.stderr == _raw(logs[1]) == "[hidden]-2\n"


def test_a_line_ends_at_cr_unless_lf_only() -> None:
    argv = ["bash", "-c", "printf 'a\\rb\\r\\nc\\n'"]
    assert launcher.run(argv).stdout == "a\nb\nc\n"
    assert launcher.run(argv, lf_only=True).stdout == "a\rb\r\nc\n"


def test_stdin_text_reaches_the_child() -> None:
    assert launcher.run(["cat"], stdin_text="prompt é\n").stdout == "prompt é\n"
