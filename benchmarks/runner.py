"""What every per-stack benchmark runner shares: arguments, the random-token data, the timed loop, and a
result file written whatever happens (out of memory and errors are results, never crashes).

A runner is `python -m benchmarks.<runner> --model M --seq-length S --micro-batch-size B --warmup W
--steps N --json PATH [--device cuda|cpu]` and writes one JSON object to PATH:
{"status": "ok" | "oom" | "unsupported" | "error", "message", and when ok: "step_times_s" (all steps,
warm-up first), "step_time_s" (median of measured), "tokens_per_s", "mfu", "peak_mem_gib", "losses"}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.metrics import GIB, summarize
from gates.model_config import MiniCPMConfig, load


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="minicpm4-0.5b", help="preset name or model config path")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="measured steps after warm-up")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, type=Path, help="result file")
    return p


def random_tokens(cfg: MiniCPMConfig, steps: int, micro_batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every runner's data: (input_ids, labels), int64, (steps, micro_batch, seq), from one CPU generator,
    so every stack trains on the same tokens for the same seed and shapes."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (steps, micro_batch, seq + 1), generator=gen)
    return tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous()


def environment(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
            "cpu": platform.processor() or platform.machine(), "device": device}
    if device == "cuda" and torch.cuda.is_available():
        info |= {"device_name": torch.cuda.get_device_name(), "gpu_count": torch.cuda.device_count(),
                 "cuda": torch.version.cuda}
    else:
        info["device_name"] = "cpu"
    return info


def timed_steps(step: Callable[[int], float], total: int, device: str) -> tuple[list[float], list[float]]:
    """Runs step(i) for i in range(total), synchronizing the device around each; returns (times, losses)."""
    times, losses = [], []
    for i in range(total):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step(i)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return times, losses


def peak_memory_gib(device: str) -> float | None:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / GIB
    return None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run(args: argparse.Namespace, stack: str, body: Callable[[MiniCPMConfig], dict]) -> int:
    """Calls body(cfg) -> {step_times_s, losses, ...}; writes the result file in every outcome.
    Exit code 0 for ok, 77 unsupported, 3 out of memory, 1 error."""
    result: dict = {"stack": stack, "micro_batch_size": args.micro_batch_size, "seq_length": args.seq_length,
                    "warmup": args.warmup, "steps": args.steps, "seed": args.seed, "model": args.model}
    result |= environment(args.device)
    code = 0
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise NotImplementedError("no CUDA device on this machine")
        cfg = load(args.model)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out = body(cfg)
        tokens_per_step = args.micro_batch_size * args.seq_length
        result |= out | summarize(out["step_times_s"], args.warmup, tokens_per_step, cfg, args.seq_length)
        result |= {"status": "ok", "tokens_per_step": tokens_per_step, "peak_mem_gib": peak_memory_gib(args.device)}
    except NotImplementedError as e:
        result |= {"status": "unsupported", "message": str(e)}
        code = 77
    except BaseException as e:  # noqa: BLE001 - a failed stack is a recorded result
        if is_oom(e):
            result |= {"status": "oom", "message": f"{type(e).__name__}: {str(e)[:400]}",
                       "peak_mem_gib": peak_memory_gib(args.device)}
            code = 3
        else:
            result |= {"status": "error", "message": f"{type(e).__name__}: {str(e)[:400]}",
                       "traceback": traceback.format_exc()[-3000:]}
            code = 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{stack}: {result['status']}" + (f" {result['tokens_per_s']:.0f} tokens/s, MFU {100 * result['mfu']:.1f} %"
                                            if result["status"] == "ok" else f" ({result.get('message', '')})"),
          file=sys.stderr)
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: CUDA/NCCL state of a failed run must not hang the driver
