"""Markdown rendering of a comparison (benchmarks/compare.py's JSON)."""

from __future__ import annotations

BASELINES = ("megatron-sdpa", "megatron", "torch-compile")


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.1f} %" if abs(x) >= 0.1 else f"{x:.1e} %"


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def commit_note(doc: dict) -> str:
    """The commit a report measured; git_dirty None: the caller named it (FORGE_GIT_COMMIT, a device copy
    of the tree, whose own git state is meaningless)."""
    dirty = doc.get("git_dirty")
    return f"commit {doc['git_commit'][:12]}" + (" (given by the caller)" if dirty is None else " (dirty)" if dirty else "")


def markdown(doc: dict) -> str:
    s, hw, v = doc["settings"], doc["hardware"], doc["versions"]
    lines = [
        f"# Side-by-side training throughput: {s['model']}, seq {s['seq_length']}",
        "",
        f"{hw.get('device_name', '?')} x1, torch {v.get('torch')}, triton {v.get('triton') or '—'}, "
        f"megatron-core {v.get('megatron_core') or '—'}; {commit_note(doc)}; {doc['created']}.",
        f"Steps: {s['warmup']} warm-up + {s['steps']} measured, median step time; random tokens, seed {s['seed']}. "
        f"MFU = {s['flops_per_token'] / 1e9:.3f} GFLOP/token x tokens/s / {s['peak_tflops']} TFLOP/s "
        "(docs/DESIGN.md: Megatron-LM v0.15's count, causal attention halved, true vocab).",
        "Megatron runs without Transformer Engine (local layer spec); `megatron-sdpa` swaps only its core attention.",
        "",
        "| stack | micro batch | status | tokens/s | step s | MFU | peak GiB | x megatron-sdpa | x megatron | x torch.compile | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        vs = r.get("vs", {})
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        note = r.get("note", "")
        if r["status"] != "ok" and r.get("message"):
            note = f"{note}; {r['message']}" if note else r["message"]
        tried = [a for a in r.get("attempts", []) if a["status"] != "ok"]
        if r["status"] == "ok" and tried:
            note += "; " + ", ".join(f"{a['status']} at micro batch {a['micro_batch_size']}" for a in tried)
        lines.append(
            f"| {r['stack']} | {r.get('micro_batch_size', '—')} | {r['status']} | {_num(r.get('tokens_per_s'), ',.0f')} | "
            f"{_num(r.get('step_time_s'), '.3f')} | {_pct(mfu)} | "
            f"{_num(r.get('peak_mem_gib'), '.1f')} | " + " | ".join(_ratio(vs.get(b)) for b in BASELINES)
            + f" | {note.replace('|', '/')} |"
        )
    lines += ["", "Ratios are tokens/s of the row over tokens/s of the baseline, measured in this run.", ""]
    return "\n".join(lines)
