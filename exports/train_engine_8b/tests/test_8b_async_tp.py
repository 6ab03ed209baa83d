"""`--async-tp` (runtime.async_tp): overlap of the TP collectives with the GEMMs through Inductor's micro-pipeline
TP pass. It needs CUDA, TP > 1 and compile, so on the CPU only its refusals and its wiring are tested here; the
overlap itself needs two GPUs (none lent yet)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from train_engine_8b import config, parallelize
from train_engine_8b.core.errors import EngineError
from train_engine_8b.model import build_model
from train_engine_8b.model_config import preset
from train_engine_8b.parallelize import ParallelError, parallelize_model


@pytest.mark.parametrize("runtime, why", [
    (dict(device="cpu", tp=2), "device cpu"),
    (dict(device="cuda", tp=1, compile=True), "tp 1"),
    (dict(device="cuda", tp=2, compile=False), "compile False"),
])
def test_async_tp_is_refused_where_it_cannot_run(runtime, why):
    with pytest.raises(EngineError, match=f"runtime.async_tp needs CUDA, runtime.tp > 1 and runtime.compile .*{why}"):
        config.build(model=preset("minicpm4-8b-reduced"), runtime=dict(async_tp=True, **runtime))
    config.build(model=preset("minicpm4-8b-reduced"), runtime=dict(runtime, async_tp=False))  # the rest is fine


def test_parallelize_refuses_async_tp_without_a_tp_mesh():
    with pytest.raises(ParallelError, match="async TP needs tensor parallelism and compile"):
        parallelize_model(build_model(preset("minicpm4-8b-reduced")), None, compile=True, async_tp=True)


def test_apply_async_tp_turns_on_inductors_pass_for_the_tp_group(monkeypatch):
    import torch._inductor.config as inductor
    import torch.distributed._symmetric_memory as symm

    enabled: list[str] = []
    monkeypatch.setattr(symm, "enable_symm_mem_for_group", enabled.append)
    monkeypatch.setattr(inductor, "_micro_pipeline_tp", False)
    mesh = SimpleNamespace(get_group=lambda: SimpleNamespace(group_name="tp-group-7"))
    parallelize.apply_async_tp(mesh)
    assert inductor._micro_pipeline_tp is True and enabled == ["tp-group-7"]
    assert torch._inductor.config._micro_pipeline_tp is True
