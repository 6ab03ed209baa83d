"""The package's vendored core (core/, ops/, data/, minicpm/) is the one its vendored_core.json stamps, and the core's
tests vendored with it (tests/core_train_engine_0_5b/) are the ones their vendored_tests.json stamps: an edit made here
instead of in the forge workspace's engine_core/ fails these tests."""

from __future__ import annotations

from pathlib import Path

import train_engine_0_5b
from train_engine_0_5b.core import vendored


def test_vendored_core_matches_its_stamp():
    problems = vendored.drift(Path(train_engine_0_5b.__file__).parent)
    assert not problems, "\n".join(problems)


def test_vendored_core_tests_match_their_stamp():
    problems = vendored.drift_tests(vendored.tests_dir(Path(train_engine_0_5b.__file__).parent))
    assert not problems, "\n".join(problems)
