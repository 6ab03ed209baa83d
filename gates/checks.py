"""Contract checks on an engine's outputs, run before any numeric comparison.

In order: every expected name present, every shape as the contract says, every value finite, and no
output an exact copy of an input (a `weight.X` equal to the initial weight although lr > 0, a
`grad.X` equal to the weight, logits equal to some input tensor). The first problem, in layer order,
is the localization.
"""

from __future__ import annotations

import re

import torch

from gates.case import Case, hf_param_shapes
from gates.report import Localization


def layer_of(name: str) -> int | None:
    """Decoder layer index of a tensor name (`hidden_states.i` -> i - 1; `...layers.i...` -> i)."""
    m = re.search(r"hidden_states\.(\d+)$", name)
    if m:
        return int(m.group(1)) - 1
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def layer_order(names: list[str], case: Case) -> list[str]:
    """Names sorted as the model runs: per-step series first; then hidden states 0..L or parameters
    in module order (embedding, layers 0..L-1, final norm, head); then logits and loss."""
    params = list(hf_param_shapes(case.spec.model))
    rank = {n: i for i, n in enumerate(params)}

    def key(name: str) -> tuple[int, int, str]:
        base = name.split(".", 1)[1] if name.startswith(("grad.", "weight.")) else None
        if base in rank:
            return (2, rank[base], name)
        m = re.fullmatch(r"hidden_states\.(\d+)", name)
        if m:
            return (1, int(m.group(1)), name)
        if name in ("losses", "grad_norms", "lrs"):
            return (0, 0, name)
        return (3, 0 if name == "logits" else 1, name)  # logits, then loss: the end of the forward

    return sorted(names, key=key)


def expected_shapes(probe: str, case: Case) -> dict[str, tuple[int, ...]]:
    spec, cfg = case.spec, case.spec.model
    params = hf_param_shapes(cfg)
    if probe == "forward":
        rows = spec.global_batch_rows
        out = {"logits": (rows, spec.seq_length, cfg.vocab_size), "loss": ()}
        return out | {f"hidden_states.{i}": (rows, spec.seq_length, cfg.hidden_size) for i in range(cfg.num_layers + 1)}
    if probe == "backward":
        return {"loss": ()} | {f"grad.{k}": s for k, s in params.items()}
    if probe in ("steps", "checkpoint"):
        series = {k: (spec.steps,) for k in ("losses", "grad_norms", "lrs")}
        return series | {f"weight.{k}": s for k, s in params.items()}
    raise ValueError(f"unknown probe {probe!r}")


def _inputs(case: Case) -> dict[str, torch.Tensor]:
    """Every input tensor a lazy engine could hand back: weights and each step's ids / labels."""
    out = {f"input weight {k}": v for k, v in case.weights.items()}
    for t in range(case.spec.steps):
        ids, labels = case.global_batch(t)
        out[f"input_ids of step {t}"] = ids
        out[f"labels of step {t}"] = labels
    return out


def _copy_of(t: torch.Tensor, inputs: dict[str, torch.Tensor]) -> str | None:
    for name, x in inputs.items():
        if x.numel() != t.numel() or x.numel() <= 1:
            continue
        a, b = x.reshape(-1), t.reshape(-1)
        if a.dtype != b.dtype:
            a, b = a.double(), b.double()
        if torch.equal(a, b):
            return name
    return None


def check_outputs(probe: str, tensors: dict[str, torch.Tensor], case: Case, lr_positive: bool = True) -> Localization | None:
    """None if the outputs keep the contract; else where they first break it."""
    want = expected_shapes(probe, case)
    missing = layer_order([k for k in want if k not in tensors], case)
    if missing:
        return Localization(what=f"missing output {missing[0]!r} ({len(missing)} missing of {len(want)})",
                            tensor=missing[0], layer=layer_of(missing[0]))
    for name in layer_order(list(want), case):
        got = tuple(tensors[name].shape)
        if got != want[name]:
            return Localization(what=f"{name}: shape {list(got)}, the contract says {list(want[name])}",
                                tensor=name, layer=layer_of(name))
    for name in layer_order(list(want), case):
        t = tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            n_bad = int((~torch.isfinite(t)).sum())
            return Localization(what=f"{name}: {n_bad} non-finite values ({kind})", tensor=name, layer=layer_of(name))
    inputs = _inputs(case)
    for name in layer_order(list(want), case):
        if name in ("loss", "losses", "grad_norms", "lrs"):
            continue
        if name.startswith("weight.") and not lr_positive:
            continue
        src = _copy_of(tensors[name], inputs)
        if src is not None:
            why = " although lr > 0" if name.startswith("weight.") else ""
            return Localization(what=f"{name} is an exact copy of the {src}{why}", tensor=name, layer=layer_of(name))
    return None
