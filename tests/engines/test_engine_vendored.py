"""The engine vendors workspace code so it installs alone (cli_help.py from harness/cli_help.py; the MiniCPM config,
its HF reader and writer and hf_param_shapes (minicpm/, through model_config.py) from gates/model_config.py and
gates/case.py; minicpm/hf_fold.py from gates/hf_fold.py; probe.py's case.json schema from gates/case.py). The copies must stay faithful: same presets, FLOP count, parameter layout, HF config and
fold, checked on every preset and fresh random weights, and the same case fields, types, defaults and bounds."""

from __future__ import annotations

from pathlib import Path

import engine_testlib
import pytest
import torch

from gates import case as ws_case, hf_fold as ws_fold, model_config as ws_cfg
from train_engine_0_5b import model_config as eng_cfg, probe as eng_probe
from train_engine_0_5b.minicpm import hf_fold as eng_fold


def _schema(model) -> dict:
    """A pydantic model's JSON schema without its prose (titles, descriptions): fields, types, defaults, bounds."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("title", "description")}
        return [strip(v) for v in x] if isinstance(x, list) else x
    return strip(model.model_json_schema())


def test_probe_reads_the_case_schema_the_gates_write():
    assert _schema(eng_probe.CaseSpec) == _schema(ws_case.CaseSpec)
    assert eng_probe.CASE_FORMAT == ws_case.CASE_FORMAT


def test_engine_presets_are_workspace_presets():
    assert set(eng_cfg.PRESETS) <= set(ws_cfg.PRESETS)  # its own model and the tiny one, not the 8B


@pytest.mark.parametrize("name", list(eng_cfg.PRESETS))
def test_same_config_math(name):
    ws, eng = ws_cfg.preset(name), eng_cfg.preset(name)
    assert eng.model_dump() == ws.model_dump()
    assert (eng.dim_head, eng.residual_scale, eng.logit_scale, eng.num_params()) == \
        (ws.dim_head, ws.residual_scale, ws.logit_scale, ws.num_params())
    for seq in (1, 4096, 32768):
        assert eng.flops_per_token(seq) == ws.flops_per_token(seq)
    assert eng_cfg.hf_param_shapes(eng) == ws_case.hf_param_shapes(ws)
    assert eng_cfg.to_hf_minicpm_config(eng) == ws_cfg.to_hf_minicpm_config(ws)
    assert eng_fold.llama_config_dict(eng, 1, 2) == ws_fold.llama_config_dict(ws, 1, 2)
    for seq in (1, 4096, 32768):
        assert eng.rope_at(seq) == ws.rope_at(seq)


def test_released_config_files_are_the_workspace_ones():
    """The engine's preset is read from its own copy of the released config.json: byte for byte the workspace's."""
    from pathlib import Path

    import gates
    import train_engine_0_5b

    name = "data/released/minicpm4-0.5b.json"
    assert (Path(train_engine_0_5b.__file__).parent / name).read_bytes() == (Path(gates.__file__).parent / name).read_bytes()


@pytest.mark.parametrize("tied", [True, False])
def test_same_fold(tied):
    ws = ws_cfg.preset("tiny").model_copy(update={"tie_word_embeddings": tied})
    eng = eng_cfg.MiniCPMConfig(**ws.model_dump())
    weights = ws_case.random_weights(ws, seed=int(torch.randint(0, 2**31, ())))
    a, b = eng_fold.fold_to_llama(eng, weights), ws_fold.fold_to_llama(ws, weights)
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_tests_adamw_step_share_is_the_gates_one():
    from gates.policies import ADAMW_STEP_SHARE

    assert engine_testlib.ADAMW_STEP_SHARE == ADAMW_STEP_SHARE


def test_released_config_fixtures_are_the_workspace_ones():
    """Released configs the engine's tests carry but the engine does not ship (8B): the workspace's, byte for byte."""
    import gates

    fixtures = engine_testlib.ENGINE / "tests" / "data" / "released"
    names = sorted(f.name for f in fixtures.glob("*.json"))
    assert names == ["minicpm4-8b.json"]
    for name in names:
        assert (fixtures / name).read_bytes() == (Path(gates.__file__).parent / "data" / "released" / name).read_bytes()


def test_cli_help_is_the_workspace_one():
    """The engine's plain `--help` (cli_help.py) is the harness's, byte for byte."""
    import harness.cli_help
    import train_engine_0_5b.cli_help
    import train_engine_8b.cli_help

    for copy in (train_engine_0_5b.cli_help, train_engine_8b.cli_help):
        assert Path(copy.__file__).read_bytes() == Path(harness.cli_help.__file__).read_bytes(), copy.__name__
