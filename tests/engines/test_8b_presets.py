"""train_engine_8b's presets are the workspace's (gates/model_config.py): the gates build the 8B engine's cases
(`--case minicpm4-8b-reduced`, GateOptions.tp) from the same config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gates import model_config as ws_cfg

SRC = Path(__file__).resolve().parents[2] / "exports" / "train_engine_8b" / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from train_engine_8b import model_config as eng_cfg  # noqa: E402


@pytest.mark.parametrize("name", list(eng_cfg.PRESETS))
def test_8b_presets_are_workspace_presets(name):
    assert eng_cfg.preset(name).model_dump() == ws_cfg.preset(name).model_dump()
    assert eng_cfg.preset(name).num_params() == ws_cfg.preset(name).num_params()
