"""Process control: who a child is (pid, group, session, start time, command), ending a group only after
checking that identity, the descendants of a live run, and signals that end a round.

Every child forge starts leads its own session (start_new_session). `ProcRecord` is what inflight.json keeps
of each group; `end_group` kills a recorded group on resume only when its leader is still the process that
was recorded (boot id + start time, and a command line it was seen with or the round's tag in its
environment: `bash -c CMD` execs CMD, so a command line alone may have changed since), or, the leader gone,
when members of that group started after it; a PID that now names another process is left alone.

`Tracker` records the groups of a round (the ones forge starts, reported at spawn, and any other
descendant's, seen by a watcher thread: the gates start their own) and ends them all when the round ends
or forge is told to stop. A sandboxed round's processes also die with forge (bwrap --die-with-parent).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, Field

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
TAG = "FORGE_ROUND_TAG"  # set in every agent process's environment: run id and round


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP reached forge: the round ends, its processes with it (a BaseException, like
    KeyboardInterrupt, so no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class ProcRecord(BaseModel):
    pid: int
    pgid: int
    sid: int
    start_ticks: int                 # /proc/<pid>/stat field 22: clock ticks after boot
    boot_id: str
    cmdlines: list[list[str]] = Field(default_factory=list)  # as seen (an exec changes it)
    tag: str = ""                    # the round's FORGE_ROUND_TAG, where its processes carry it
    role: str = ""


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat(pid: int) -> tuple[int, int, int, int] | None:
    """(ppid, pgid, sid, start_ticks) of a live, non-zombie process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    f = text[text.rindex(")") + 2:].split()
    if f[0] in ("Z", "X"):
        return None
    return int(f[1]), int(f[2]), int(f[3]), int(f[19])


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _tagged(pid: int, tag: str) -> bool:
    try:
        return f"{TAG}={tag}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def describe(pid: int, role: str = "", tag: str = "") -> ProcRecord | None:
    st = _stat(pid)
    if st is None:
        return None
    _, pgid, sid, start = st
    cmd = _cmdline(pid)
    for _ in range(50):  # empty while an exec is under way: read again
        if cmd or _stat(pid) is None:
            break
        time.sleep(0.001)
        cmd = _cmdline(pid)
    return ProcRecord(pid=pid, pgid=pgid, sid=sid, start_ticks=start, boot_id=boot_id(), cmdlines=[cmd] if cmd else [],
                      tag=tag, role=role)


def now_ticks() -> int:
    """Clock ticks after boot, now (the unit of a process's start time)."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return int(uptime * os.sysconf("SC_CLK_TCK"))


def _all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def descendants(root: int) -> list[int]:
    """Live descendants of `root` (by parent links, read now)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL the group `pid` leads and every descendant's group (also one that left for a session of its own);
    only for an unreaped child of ours, whose tree is still linked to it."""
    own = os.getpgrp()
    groups = {pid}
    for d in descendants(pid):
        st = _stat(d)
        if st is not None and st[1] != own:
            groups.add(st[1])
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def same_process(rec: ProcRecord) -> bool:
    """The process now at `rec.pid` is the one recorded: same boot, same start time, and a command line it was
    seen with or the round's tag in its environment."""
    st = _stat(rec.pid)
    if st is None or rec.boot_id != boot_id() or st[3] != rec.start_ticks:
        return False
    return _cmdline(rec.pid) in rec.cmdlines or bool(rec.tag and _tagged(rec.pid, rec.tag))


def group_members(rec: ProcRecord) -> list[int]:
    """Live processes of `rec`'s group that cannot predate it (same boot, started no earlier)."""
    if rec.boot_id != boot_id():
        return []
    out = []
    for pid in _all_pids():
        st = _stat(pid)
        if st is not None and st[1] == rec.pgid and st[3] >= rec.start_ticks:
            out.append(pid)
    return out


def end_group(rec: ProcRecord) -> str:
    """SIGKILL the group of `rec` after the identity check; what was done, in words."""
    if rec.pgid in (0, 1, os.getpgrp()):
        return f"group {rec.pgid}: not ours to end"
    if describe(rec.pid) is not None:
        if not same_process(rec):
            return f"pid {rec.pid} is now another process: left alone"
    elif rec.pid == rec.pgid and not group_members(rec):
        return f"group {rec.pgid}: already gone"
    elif rec.pid != rec.pgid:
        return f"pid {rec.pid}: already gone"
    try:
        os.killpg(rec.pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError) as e:
        return f"group {rec.pgid}: {type(e).__name__}"
    what = rec.role or " ".join((rec.cmdlines or [[]])[0][:2])
    return f"group {rec.pgid} ({what}) ended"


class Tracker:
    """The process groups of the current round: recorded as they appear, ended together."""

    def __init__(self, on_change: Callable[[list[ProcRecord]], None] = lambda recs: None, poll_s: float = 0.5) -> None:
        self.records: list[ProcRecord] = []
        self._on_change = on_change
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._since = 0  # processes that started before the round are not the round's
        self.tag = ""    # the current round's FORGE_ROUND_TAG

    def spawned(self, pid: int, role: str = "") -> None:
        """A child forge just started (its own session): record it before anything else happens."""
        rec = describe(pid, role, self.tag)
        if rec is not None:
            self._add([rec])

    def _add(self, recs: list[ProcRecord]) -> None:
        changed = False
        with self._lock:
            for r in recs:
                old = next((o for o in self.records if o.pid == r.pid and o.start_ticks == r.start_ticks), None)
                if old is None:
                    self.records.append(r)
                    changed = True
                elif r.cmdlines and r.cmdlines[0] not in old.cmdlines:
                    old.cmdlines.append(r.cmdlines[0])
                    changed = True
            snapshot = list(self.records)
        if changed:
            self._on_change(snapshot)

    def scan(self) -> None:
        """Record the leader of every descendant's group started in the round, except forge's own group."""
        own = os.getpgrp()
        recs = []
        for pid in descendants(os.getpid()):
            st = _stat(pid)
            if st is None or st[1] == own or st[3] < self._since:
                continue
            leader = describe(st[1], tag=self.tag)
            if leader is not None and leader.pgid == st[1]:
                recs.append(leader)
        self._add(recs)

    @contextmanager
    def watching(self) -> Iterator["Tracker"]:
        """A watcher thread records descendants' groups while the block runs; the recorded groups are ended
        after (an interrupted round also calls `end_all`)."""
        self._stop.clear()
        self._since = now_ticks() - 1
        self._thread = threading.Thread(target=self._watch, name="forge-proc-watch", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.end_recorded()

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.scan()
            except OSError:
                continue

    def end_all(self) -> list[str]:
        """Kill every descendant started in the round (its group, or itself when it shares forge's group), and
        every recorded group that is still the one recorded."""
        own = os.getpgrp()
        for pid in descendants(os.getpid()):
            st = _stat(pid)
            if st is None or st[3] < self._since:
                continue
            try:
                if st[1] == own:
                    os.kill(pid, signal.SIGKILL)  # a live child of ours: its pid cannot have been reused
                else:
                    os.killpg(st[1], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return self.end_recorded()

    def end_recorded(self) -> list[str]:
        """End every recorded group that is still the one recorded; forget them."""
        notes = []
        with self._lock:
            recs, self.records = list(self.records), []
        for r in recs:
            if describe(r.pid) is not None or group_members(r):
                notes.append(end_group(r))
        return notes


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread, once; later ones are noted, not
    raised, so the cleanup they started finishes. The list holds the signals received. Outside the main
    thread this does nothing."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum: int, frame: object) -> None:
        got.append(signum)
        if len(got) == 1:
            raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield got
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by `signum`."""
    return 128 + signum


def wait_gone(pids: list[int], timeout_s: float = 5.0) -> bool:
    """True once none of `pids` is a live process (tests and cleanup)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if all(_stat(p) is None for p in pids):
            return True
        time.sleep(0.05)
    return False
