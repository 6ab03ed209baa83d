"""`gate all` on the real engine, exports/train_engine_0.5B, with the tiny case on CPU against the torch
reference. Here (not in tests/gates) so it shares the red-team session's worker pool and reference
cache (conftest.py). On CPU, M5's MFU part is `unsupported`: the stage's best honest outcome is M1-M4
and M6 passed, M5 `unsupported` with its loss part passed."""

from __future__ import annotations

from pathlib import Path

import pytest

from gates.runner import GATES

EXPORT = Path(__file__).resolve().parents[2] / "exports" / "train_engine_0.5B"
EXPORT_PRESENT = (EXPORT / "src" / "train_engine_0_5b" / "__main__.py").is_file()

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not EXPORT_PRESENT, reason=f"{EXPORT} is absent (its engine is not built yet)")]


def test_gate_all_on_the_export_engine(reports):
    got = reports[("export", "all")]
    detail = {r.gate: f"{r.verdict}: {r.message} | {r.localization.what if r.localization else ''}" for r in got}
    assert [r.gate for r in got] == list(GATES), detail
    expected = {g: "passed" for g in GATES} | {"m5_long_train": "unsupported"}
    assert {r.gate: r.verdict for r in got} == expected, detail
    m5 = {p.name: p.verdict for p in got[4].parts}
    assert m5 == {"loss": "passed", "mfu": "unsupported"}
