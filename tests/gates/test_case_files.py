"""Gate-made case files: a derived case with a recorded case's own weights links that case's weights file (one
copy on disk, hashed once); any other weights are written anew; the case hash follows the files' bytes."""

from __future__ import annotations

from pathlib import Path

import torch

from gates.case import case_hash, load_case, make_spec, new_case
from gates.context import GateRun
from gates.launch import Engine
from gates.runner import GateOptions

BASE = Path(__file__).parents[1] / "redteam" / "engines" / "base"


def gate_run() -> GateRun:
    return GateRun("m5_long_train", Engine(BASE, "rt_base"), GateOptions())


def test_a_derived_case_links_the_weights_it_shares_and_writes_the_rest():
    g = gate_run()
    try:
        first = g.make_case()
        longer = first.spec.model_copy(update={"steps": first.spec.steps + 2})
        batches = {k: torch.randint(0, 50, (longer.steps, *v.shape[1:]), dtype=v.dtype) for k, v in first.batches.items()}
        shared = g.write_case(longer, batches=batches, weights=first.weights)
        w_first, w_shared = first.dir / "weights.safetensors", shared.dir / "weights.safetensors"
        assert w_first.stat().st_ino == w_shared.stat().st_ino  # one file on disk
        assert torch.equal(shared.batches["input_ids"], batches["input_ids"]) and shared.spec.steps == longer.steps
        assert all(torch.equal(shared.weights[k], first.weights[k]) for k in first.weights)

        changed = {k: v + 1.0 for k, v in first.weights.items()}  # same shapes, other values: a new file
        other = g.write_case(longer, batches=batches, weights=changed)
        w_other = other.dir / "weights.safetensors"
        assert w_other.stat().st_ino != w_first.stat().st_ino
        assert all(torch.equal(other.weights[k], changed[k]) for k in changed)
        hashes = [c["hash"] for c in [g.report.case, *g.report.case["derived"]]]
        assert len(set(hashes)) == 3 and all(len(h) == 64 for h in hashes)
    finally:
        g.cleanup()


def test_the_case_hash_follows_every_file_byte(tmp_path):
    spec = make_spec("tiny", steps=2, seq_length=8, seed=5)
    a = new_case(tmp_path / "a", spec)
    b = new_case(tmp_path / "b", spec)
    assert case_hash(a) == case_hash(b)  # same seed, same bytes, different files
    for name in ("case.json", "weights.safetensors", "batches.safetensors"):
        c = new_case(tmp_path / f"c-{name}", spec)
        f = c / name
        data = bytearray(f.read_bytes())
        data[-2] ^= 1  # one bit near the end (safetensors payload; case.json's last field)
        f.write_bytes(bytes(data))
        assert case_hash(c) != case_hash(a), name
    assert load_case(a).spec == spec


def test_the_reference_reads_the_case_in_place(monkeypatch):
    """The reference stack (the workspace's code) is pointed at the recorded case itself, not a copy: an 8B-shaped
    case is 10 GB. (Engines still get copies: tests/gates/test_sandbox.py.)"""
    import pytest

    from gates import context
    from gates.context import GateStop
    from gates.launch import Proc

    seen: list[tuple[list[str], bool]] = []

    def fake_run(argv, cwd, env, deadline):
        seen.append((list(argv), (Path(cwd) / "case").exists()))  # while the reference would run
        return Proc(argv=list(argv), cwd=Path(cwd), env_set={}, rc=1, time_s=0.0, timed_out=False, stdout="", stderr="x")

    monkeypatch.setattr(context, "run_process", fake_run)
    g = gate_run()
    try:
        case = g.make_case()
        with pytest.raises(GateStop):
            g.reference_probe("forward", case, twin=False)
        [(argv, copied)] = seen
        assert argv[argv.index("--case") + 1] == str(case.dir) and not copied
    finally:
        g.cleanup()
