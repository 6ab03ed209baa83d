"""The megatron stacks' probe CLI: registered in STACKS, and `unsupported` (exit 77, with the reason)
wherever it cannot run: no CUDA, the checkpoint probe, and fp64 cases."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from gates.case import make_spec, new_case
from gates.probe import EXIT_UNSUPPORTED
from gates.stacks import STACKS

REPO = Path(__file__).resolve().parents[2]


def _run(stack: str, probe: str, case: Path, out: Path) -> subprocess.CompletedProcess:
    # keep the caller's PYTHONPATH: on the GPU machine megatron-core comes from carried wheels found through it
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([*STACKS[stack], "probe", probe, "--case", str(case), "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)


def test_both_variants_are_registered() -> None:
    assert STACKS["megatron"][-2:] == ["--attention", "unfused"]
    assert STACKS["megatron-sdpa"][-2:] == ["--attention", "sdpa"]


def test_checkpoint_is_unsupported_everywhere(tmp_path) -> None:
    case = new_case(tmp_path / "case", make_spec("tiny", steps=2, seq_length=8))
    r = _run("megatron-sdpa", "checkpoint", case, tmp_path / "out")
    assert r.returncode == EXIT_UNSUPPORTED, r.stderr
    assert "checkpoint" in r.stderr
    assert not (tmp_path / "out" / "tensors.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the stack runs instead")
def test_forward_without_cuda_exits_77_saying_why(tmp_path) -> None:
    case = new_case(tmp_path / "case", make_spec("tiny", steps=1, seq_length=8))
    r = _run("megatron", "forward", case, tmp_path / "out")
    assert r.returncode == EXIT_UNSUPPORTED, r.stderr
    assert "CUDA" in r.stderr
    assert not (tmp_path / "out" / "tensors.safetensors").exists()


def test_reason_names_megatron_core_when_it_is_missing(monkeypatch) -> None:
    import sys

    from gates.stacks.megatron.model import unavailable_reason

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for mod in [m for m in sys.modules if m == "megatron" or m.startswith("megatron.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "megatron", None)  # `import megatron.core` now raises ImportError
    reason = unavailable_reason()
    assert reason is not None and "megatron-core" in reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "CUDA" in unavailable_reason()
