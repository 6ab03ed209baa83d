"""Every environment variable the engine reads, in one place (the README lists the same).

Engine switches (prefix FORGE_ENGINE_), read when a command starts, never at import time:
- FORGE_ENGINE_HUB_TIMEOUT_S  seconds to wait for the Hugging Face Hub before a Hub dataset name fails
                              (default 10); a local path never touches the network.
- FORGE_ENGINE_PEAK_TFLOPS    dense bf16 peak per device for MFU (default on CUDA 989.4, H100/H200 SXM, DESIGN.md;
                              on the CPU none: MFU is not reported unless this names the CPU's peak).
- FORGE_ENGINE_PROGRESS       "1" forces the rich progress bar, "0" hides it (default: shown on a TTY).

Defaulted, not owned (a value the user sets wins):
- FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED  "1" before flash-attn-4 is imported: FA4 keeps its compiled kernels
                              on disk (keyed by its own sources and versions) instead of compiling them again in
                              every process; its directory is FLASH_ATTENTION_CUTE_DSL_CACHE_DIR (FA4's default
                              under the temp dir).

Read, not owned (set by torchrun or Hugging Face):
- RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torchrun's rendezvous);
- HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, HF_ENDPOINT (a Hub dataset name fails at once when offline).
"""

from __future__ import annotations

import os

DEFAULT_PEAK_TFLOPS = 989.4


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None


def hub_timeout_s() -> float:
    return _float("FORGE_ENGINE_HUB_TIMEOUT_S", 10.0)


def peak_tflops(device: str = "cuda") -> float | None:
    """The peak MFU divides by: FORGE_ENGINE_PEAK_TFLOPS, else the H100/H200's on CUDA and none on the CPU."""
    if os.environ.get("FORGE_ENGINE_PEAK_TFLOPS", "") == "" and device != "cuda":
        return None
    return _float("FORGE_ENGINE_PEAK_TFLOPS", DEFAULT_PEAK_TFLOPS)


def progress_bar(is_tty: bool) -> bool:
    raw = os.environ.get("FORGE_ENGINE_PROGRESS", "")
    return is_tty if raw == "" else raw not in ("0", "false", "no")


def default_fa4_disk_cache() -> None:
    """Turn FA4's persistent kernel cache on unless the user chose; called just before FA4 is imported."""
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")


def hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def torchrun_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); (0, 1, 0) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
