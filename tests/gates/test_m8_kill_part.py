"""M8's kill_during_save part when the run it meant to kill ends on its own: a crash is the engine's `error`
(with its stderr's last line), a decline (77) `failed`, a clean finish without a save seen `error`."""

from __future__ import annotations

import pytest

from gates import m8_resume


@pytest.mark.parametrize("rc, verdict, words", [
    (1, "error", "exited 1"), (77, "failed", "exited 77"), (0, "error", "nothing was killed")])
def test_a_run_that_ends_before_a_save_is_seen(monkeypatch, rc, verdict, words):
    seen = {"killed": False, "at_step": 0, "changed": [], "rc": rc,
            "stderr_last": "error: No space left on device" if rc == 1 else ""}
    monkeypatch.setattr(m8_resume, "run_killed_in_save", lambda *a, **k: seen)

    class Box:
        def args(self, *a, **k):
            return []

    [p], loc = m8_resume.kill_part(None, Box(), None, None, [], None, [])
    assert (p.name, p.verdict) == ("kill_during_save", verdict) and loc is None
    assert words in p.message
    if rc == 1:
        assert "No space left on device" in p.message
