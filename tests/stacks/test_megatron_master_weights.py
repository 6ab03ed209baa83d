"""The megatron trainer's bookkeeping around Megatron's optimizer, with stand-in optimizers on the CPU
(the real ones need CUDA): fp32 master weights set from the case and read back by name, for the
mixed-precision layout (whole tensors) and the distributed layout (flat shards); the per-step lr and
weight decay written into Megatron's param groups (wd_mult 0 for norms)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gates.case import OptimizerSpec, random_weights
from gates.model_config import MiniCPMConfig
from gates.stacks.megatron.convert import hf_to_megatron, megatron_param_shapes
from gates.stacks.megatron.train import MegatronTrainer

CFG = MiniCPMConfig(name="t", hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=24,
                    vocab_size=31, max_seq_length=16, tie_word_embeddings=False)


class _Gpt(nn.Module):
    """Parameters under Megatron's names (bf16, as Float16Module leaves them)."""

    def __init__(self) -> None:
        super().__init__()
        self._flat = nn.ParameterDict()
        for name, shape in megatron_param_shapes(CFG).items():
            self._flat[name.replace(".", "__")] = nn.Parameter(torch.zeros(shape, dtype=torch.bfloat16))

    def named_parameters(self, *a, **k):
        for key, p in self._flat.items():
            yield key.replace("__", "."), p


def _trainer(optimizer) -> MegatronTrainer:
    t = MegatronTrainer.__new__(MegatronTrainer)  # the constructor needs megatron-core and a process group
    t.cfg, t.gpt, t.optimizer, t.opt_spec = CFG, _Gpt(), optimizer, OptimizerSpec(weight_decay=0.1)
    return t


def _mixed_precision(gpt: _Gpt):
    params = [p for _, p in gpt.named_parameters()]
    return SimpleNamespace(float16_groups=[params[:5], params[5:]],
                           fp32_from_float16_groups=[[torch.zeros(p.shape) for p in params[:5]],
                                                     [torch.zeros(p.shape) for p in params[5:]]],
                           fp32_from_fp32_groups=[[]])


def _distributed(gpt: _Gpt):
    """One rank owning every element (world size 1), stored as flat shards with ranges."""
    params = [p for _, p in gpt.named_parameters()]
    ranges = {p: {"param": SimpleNamespace(start=0, end=p.numel())} for p in params}
    opt = SimpleNamespace(model_float16_groups=[params], shard_fp32_from_float16_groups=[[torch.zeros(p.numel()) for p in params]],
                          model_fp32_groups=[[]], shard_fp32_groups=[[]])
    opt._get_model_param_range_map = lambda p: ranges[p]
    return opt


@pytest.mark.parametrize("layout", ["mixed_precision", "distributed"])
def test_master_weights_round_trip_by_name(layout: str) -> None:
    t = _trainer(None)
    inner = _mixed_precision(t.gpt) if layout == "mixed_precision" else _distributed(t.gpt)
    t.optimizer = SimpleNamespace(chained_optimizers=[inner])
    hf = random_weights(CFG, seed=4)
    t.set_master_weights(hf)
    if layout == "distributed":  # shards are gathered with an all-reduce: a one-rank gloo group here
        from gates.stacks.megatron.model import _free_port

        own = not torch.distributed.is_initialized()
        if own:
            torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        try:
            got = t.master_weights()
        finally:
            if own:
                torch.distributed.destroy_process_group()
    else:
        got = t.master_weights()
    want = hf_to_megatron(hf, CFG)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k  # exact fp32, not bf16-rounded


def test_optimizer_step_writes_lr_and_weight_decay_per_group() -> None:
    groups = [{"lr_mult": 1.0, "wd_mult": 1.0, "lr": 0.0, "weight_decay": 0.0},
              {"lr_mult": 1.0, "wd_mult": 0.0, "lr": 0.0, "weight_decay": 0.1}]
    calls = []

    def step():
        calls.append([dict(g) for g in groups])
        return True, 2.5, None

    t = _trainer(SimpleNamespace(param_groups=groups, step=step))
    assert t.optimizer_step(3e-4) == 2.5
    seen = calls[0]
    assert [g["lr"] for g in seen] == [3e-4, 3e-4]
    assert [g["weight_decay"] for g in seen] == [0.1, 0.0]  # norms (wd_mult 0) never decay
    t.optimizer.step = lambda: (False, None, None)
    with pytest.raises(FloatingPointError):
        t.optimizer_step(1e-4)
