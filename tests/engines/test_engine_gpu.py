"""GPU checks (skipped without CUDA): bf16 probes against the torch reference on the GPU, a bit-identical
resume on the GPU with the GPU's default ops (SDPA, foreach AdamW), and `bench`.

bf16 bound: max |engine - reference| / max |reference| <= 2e-2 for logits, hidden states, loss and
gradients (a few bf16 ulps: SDPA and the math attention round differently), and for losses over
steps. The resume check is exact.
"""

from __future__ import annotations

import json

import pytest
import torch
from engine_testlib import TINY, read_jsonl, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
BF16_TOL = 2e-2


@pytest.mark.parametrize("ops", ["", "attention=reference,adamw=reference"])
@pytest.mark.parametrize("probe", ["forward", "backward", "steps"])
def test_bf16_probes_on_gpu_match_the_reference(tmp_path, probe, ops):
    from gates.case import load_case, make_spec, new_case
    from gates.probe import read_outputs, write_outputs
    from gates.stacks.torch_ref.probes import run_probe as reference_probe
    from train_engine_0_5b.ops.registry import OpSelection
    from train_engine_0_5b.probe import run_probe

    spec = make_spec("tiny", steps=3, micro_batch_size=2, grad_accum=2, seq_length=64, dtype="bfloat16", device="cuda",
                     seed=int(torch.randint(0, 2**31 - 1, (1,))))
    case = new_case(tmp_path / "case", spec)
    tensors, metrics = reference_probe(probe, load_case(case), tmp_path / "ref")
    write_outputs(tmp_path / "ref", tensors, metrics)
    run_probe(probe, case, tmp_path / "eng", OpSelection.parse(ops))
    ref, (eng, _) = read_outputs(tmp_path / "ref")[0], read_outputs(tmp_path / "eng")
    assert set(ref) == set(eng)
    for name in ("logits", "loss", "losses", "grad_norms", *[n for n in ref if n.startswith(("grad.", "hidden_states."))]):
        if name in ref:
            assert rel_err(ref[name], eng[name]) <= BF16_TOL, (name, rel_err(ref[name], eng[name]))


def test_resume_is_bit_identical_on_gpu(cli, tmp_path):
    args = [*[a if a != "cpu" else "cuda" for a in TINY], "--num-steps", "4", "--global-batch-size", "4",
            "--micro-batch-size", "2", "--seq-length", "128"]
    for name, extra in (("straight", []), ("split", ["--exit-after-steps", "2"]), ("split", ["--resume"])):
        res = cli(["pretrain", *args, "--save-dir", tmp_path / name, "--log-file", tmp_path / f"{name}.jsonl", *extra])
        assert res.exit_code == 0, res.output + res.stderr
    a, b = read_jsonl(tmp_path / "straight.jsonl"), read_jsonl(tmp_path / "split.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    from train_engine_0_5b.core import checkpoint as ckpt

    wa, wb = ckpt.load(tmp_path / "straight").master, ckpt.load(tmp_path / "split").master
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bench_on_gpu(cli, tmp_path):
    res = cli(["bench", "--model", "tiny", "--seq-length", "256", "--micro-batch-size", "2", "--steps", "3",
               "--warmup", "1", "--json", tmp_path / "bench.json"])
    assert res.exit_code == 0, res.output + res.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1 and result["peak_mem_gib"] > 0
    assert result["config"]["dtype"] == "bfloat16" and result["config"]["ops"]["attention"] == "sdpa"
