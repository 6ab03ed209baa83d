"""Tunable launch settings: each implementation declares its parameters (`table.Param`: default and domain) in
its row of ops/table.py; the elected values live in one file per engine (`TUNED_FILE`), in entries keyed by the
runtime (`runtime_key`: device name, torch / triton / CUDA versions). `resolve` (registry.py) validates them
against the declared spaces, installs the values of the selected implementations (`activate`), and the op
modules read them at launch (`value`). A key that matches no entry runs the declared defaults.

    tuned/configs.json: {"entries": [{"key": {"device", "torch", "triton", "cuda"},
                                      "ops": {op: {implementation: {parameter: value}}}, "note": str}]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from ..core.errors import EngineError
from .table import param

TUNED_FILE = Path(__file__).resolve().parents[1] / "tuned" / "configs.json"


class RuntimeKey(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    device: str
    torch: str
    triton: str | None
    cuda: str | None


class TunedEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: RuntimeKey
    ops: dict[str, dict[str, dict[str, Any]]]
    note: str = ""


class TunedFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entries: list[TunedEntry] = []


def runtime_key(device: str) -> RuntimeKey:
    """This process's key for `device` ("cpu" or "cuda")."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "cpu"
    return RuntimeKey(device=name, torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda)


def read_tuned(path: Path | None = None) -> TunedFile:
    """The tuned-config file (missing: no entries); a malformed one is an EngineError naming the file."""
    path = TUNED_FILE if path is None else path
    if not path.is_file():
        return TunedFile()
    try:
        return TunedFile.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError) as e:
        raise EngineError(f"tuned configs {path}: {e}") from None


def write_tuned(tuned: TunedFile, path: Path | None = None) -> None:
    path = TUNED_FILE if path is None else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(tuned.model_dump(mode="json"), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def elected_for(tuned: TunedFile, key: RuntimeKey) -> dict[str, dict[str, dict[str, Any]]]:
    """The `ops` of the entry whose key is `key`, or {} (then the declared defaults run)."""
    return next((e.ops for e in tuned.entries if e.key == key), {})


# (op, implementation) -> the values the last `resolve` selected; written only by `activate`
_ACTIVE: dict[tuple[str, str], dict[str, Any]] = {}


def activate(values: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Install the resolved values (one resolve per process: the model and its ops are built once)."""
    _ACTIVE.clear()
    _ACTIVE.update({k: dict(v) for k, v in values.items()})


def value(op: str, impl: str, name: str) -> Any:
    """The value an op module launches with: the resolved one, else the declared default."""
    active = _ACTIVE.get((op, impl))
    return active[name] if active is not None and name in active else param(op, impl, name).default
