"""An Inspection (harness/inspection.py) as report.md and loss_mfu.png; every figure names its hardware."""

from __future__ import annotations

from pathlib import Path

from harness.gating import round_label
from harness.inspection import Inspection, _fmt, key_numbers


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(ins: Inspection) -> str:
    m = ins.manifest
    lines = [f"# {Path(ins.engine).name}", "", f"Engine: `{ins.engine}`", ""]
    if ins.model:
        lines += ["## Model", "", ", ".join(f"{k} {v}" for k, v in ins.model.items()), ""]
    if ins.engine_info:
        lines += ["built for (model_spec.toml [engine]; where it was proven: the gates' hardware below): "
                  + ", ".join(f"{k}: {v}" for k, v in ins.engine_info.items() if not isinstance(v, dict)), ""]
    if ins.ops:
        cols = sorted({k for r in ins.ops for k in r} - {"op"})
        lines += ["## Ops", ""] + _table(["op", *cols], [[r["op"]] + [", ".join(r[c]) if isinstance(r.get(c), list)
                                                                       else _fmt(r.get(c)) for c in cols] for r in ins.ops])
        lines.append("")
    spec = m.get("spec") or {}
    lines += ["## Gates passed (manifest.json)", "", f"spec: {spec.get('name', '-')} ({spec.get('path', '-')}), "
              f"reference {spec.get('reference', '-')}, commit {_fmt(m.get('commit'))}", ""]
    if ins.gates:
        lines += _table(["gate", "verdict", "key numbers", "case", "hardware", "commit"],
                        [[g["gate"], g["verdict"], ", ".join(f"{k}={_fmt(v)}" for k, v in key_numbers(g["metrics"], 5)),
                          g.get("case", "-"), g["hardware"], g["commit"]] for g in ins.gates])
        lines += [f"- {g['gate']} {part} unsupported: {why}" for g in ins.gates for part, why in g["why"].items() if why]
    else:
        lines.append("no gate recorded")
    for op, o in (m.get("ops") or {}).items():
        lines.append(f"- op {op}: {o.get('metric')} {_fmt(o.get('value'))} (baseline {_fmt(o.get('baseline'))})")
    lines += ["", "## Forge history (the run that wrote manifest.json)", ""]
    if ins.rounds:
        lines += _table(["stage", "round", "backend", "verdict", "tokens in/out", "cost $", "wall s", "commit"],
                        [[r.get("stage", "") + (f"-{r['op']}" if r.get("op") else ""), str(r.get("round")),
                          str(r.get("backend")), round_label(str(r.get("verdict")), r.get("gates") or []),
                          f"{_fmt(r.get('tokens_in'))}/{_fmt(r.get('tokens_out'))}", _fmt(r.get("cost_usd")),
                          _fmt(r.get("wall_s")), str(r.get("commit") or "-")[:10]] for r in ins.rounds])
    else:
        lines.append("no forge history")
    if ins.benchmarks:
        lines += ["", "## Benchmarks (--bench)", ""]
        lines += _table(["file", "stack", "device", "tokens/s", "MFU", "step s", "peak GiB"],
                        [[b["file"], b["stack"], b["device"], _fmt(b["tokens_per_s"]), _fmt(b["mfu"]),
                          _fmt(b["step_time_s"]), _fmt(b["peak_mem_gib"])] for b in ins.benchmarks])
    for t in ins.train_logs:
        lines += ["", f"## Training log `{t.path}` ({t.device})", ""]
        if t.steps:
            lines.append(f"{len(t.steps)} steps; loss {_fmt(t.steps[0]['loss'])} -> {_fmt(t.steps[-1]['loss'])}; "
                         f"last MFU {_fmt(t.steps[-1].get('mfu'))}; tokens/s {_fmt(t.steps[-1].get('tokens_per_s'))}")
        if t.evals:
            lines.append(f"eval loss at {len(t.evals)} steps: {_fmt(t.evals[0]['eval_loss'])} (step {t.evals[0]['step']}) "
                         f"-> {_fmt(t.evals[-1]['eval_loss'])} (step {t.evals[-1]['step']}); "
                         f"eval ppl {_fmt(t.evals[-1].get('eval_ppl'))}")
    if ins.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in ins.notes]
    return "\n".join(lines) + "\n"


def _num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def mfu_bars(ins: Inspection) -> list[tuple[str, float]]:
    """(label with its hardware, MFU %) for every measured MFU that is not a training step's: the --bench rows and
    the gates' (M5's speed part)."""
    bars = [(f"{b['stack'][-28:]} ({b['device']})", 100 * b["mfu"]) for b in ins.benchmarks if _num(b.get("mfu"))]
    bars += [(f"gate {g['gate']} ({g['hardware']})", 100 * g["metrics"]["mfu.mfu"]) for g in ins.gates
             if _num(g["metrics"].get("mfu.mfu"))]
    return sorted(bars, key=lambda b: -b[1])[:8]


def plot(ins: Inspection, path: Path) -> list[str]:
    """Left: train loss per step and eval loss beside it, per log, labelled with the device it trained on.
    Right: MFU per step where a log has GPU-scale MFU, else the measured MFUs (bench rows, gates) as labelled bars,
    else a panel that says none was measured. Returns the figure's titles, legend entries and bar labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_mfu) = plt.subplots(1, 2, figsize=(12, 4.2))
    for t in ins.train_logs:
        name = Path(t.path).name
        if t.steps:
            ax_loss.plot([r["step"] for r in t.steps], [r["loss"] for r in t.steps], label=f"train loss, {name} ({t.device})")
        if t.evals:
            ax_loss.plot([r["step"] for r in t.evals], [r["eval_loss"] for r in t.evals], "o--",
                         label=f"eval loss, {name} ({t.device})")
    devices = sorted({t.device for t in ins.train_logs})
    ax_loss.set(title="loss" + (f" ({', '.join(devices)})" if devices else ": no training log given (--log)"),
                xlabel="step", ylabel="loss")
    step_mfu = [(t, [r.get("mfu") for r in t.steps]) for t in ins.train_logs]
    step_mfu = [(t, m) for t, m in step_mfu if any(_num(x) and x >= 0.01 for x in m)]  # GPU scale: CPU MFU is ~0
    bars = mfu_bars(ins)
    if step_mfu:
        for t, m in step_mfu:
            ax_mfu.plot([r["step"] for r in t.steps], [100 * x if _num(x) else float("nan") for x in m],
                        label=f"{Path(t.path).name} ({t.device})")
        ax_mfu.set(title="MFU per step (%)", xlabel="step", ylabel="MFU %")
    elif bars:
        ax_mfu.barh([b[0] for b in bars], [b[1] for b in bars], color="tab:gray")
        ax_mfu.invert_yaxis()
        ax_mfu.tick_params(axis="y", labelsize=7)
        ax_mfu.set(title="measured MFU (%), with the hardware of each", xlabel="MFU %")
    else:
        ax_mfu.set_axis_off()
        ax_mfu.text(0.5, 0.5, "no MFU measured for this engine\n(MFU is a GPU figure: M5's speed part, bench on CUDA)",
                    ha="center", va="center", fontsize=9, transform=ax_mfu.transAxes)
        ax_mfu.set_title("MFU")
    for ax in (ax_loss, ax_mfu):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(Path(ins.engine).name)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    texts = [ax.get_title() for ax in (ax_loss, ax_mfu)] + [t.get_text() for t in ax_mfu.get_yticklabels()]
    texts += [t for ax in (ax_loss, ax_mfu) for t in ax.get_legend_handles_labels()[1]]
    plt.close(fig)
    return texts
