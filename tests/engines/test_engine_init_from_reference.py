"""`pretrain --init-from` on released-layout directories: the first step's loss is the workspace reference's on the
checkpoint's weights (LongRoPE, eps, padding and tying as released). The engine's own test file builds the
directories (official_dir) and runs the rest of the contract without the workspace."""

from __future__ import annotations

import pytest
import torch
from engine_testlib import read_log
from safetensors.torch import load_file
from test_engine_init_from import _pretrain, _with_tokenizer, official_dir

from gates.stacks.torch_ref.model import MiniCPM, loss_sum
from train_engine_0_5b.model_config import from_hf_config


@pytest.mark.parametrize("release, layout", [("minicpm4-0.5b", "sharded"), ("minicpm4-8b", "safetensors")])
def test_first_step_loss_is_the_references(cli, tmp_path, release, layout):
    d, weights = official_dir(tmp_path, release, layout)
    _with_tokenizer(d)
    res = _pretrain(cli, d, tmp_path)
    assert res.exit_code == 0, res.output + res.stderr
    cfg, _ = from_hf_config(d)
    ref = MiniCPM(cfg)
    ref.load_state_dict(weights)
    batch = load_file(str(tmp_path / "batches.safetensors"))
    with torch.no_grad():
        total, count = loss_sum(ref(batch["input_ids"][0]), batch["labels"][0])
    logged = read_log(tmp_path / "log.jsonl")[0]["loss"]
    assert abs(logged - float(total / count)) <= 1e-5 * float(total / count)
