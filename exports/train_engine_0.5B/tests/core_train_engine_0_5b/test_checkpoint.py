"""Checkpoints: 6 straight steps == 3 steps + resume + 3 steps, bitwise (losses, grad norms, weights,
optimizer state); the Hugging Face export reproduces the engine's logits in `transformers`; an
interrupted save leaves the last good checkpoint and pointer untouched; checkpoints of formats 1 and 2
(whole safetensors files) still load and resume bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

from .core_testlib import engine_import, read_jsonl, read_log, rel_err
from .engine_fixture import SMALL_RUN, model_holding

ckpt, checksums = engine_import("core", "checkpoint", "checksums")
(DistContext,) = engine_import("core.dist", "DistContext")
(AdamW,) = engine_import("core.optim", "AdamW")

TRAIN = [*SMALL_RUN, "--num-steps", "6", "--global-batch-size", "4", "--micro-batch-size", "2", "--lr-schedule", "cosine"]
HF_REL_TOL = 1e-5  # the fold rescales weights instead of activations: fp32 rounding only (8B small model: 1.7e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One straight 6-step run and one run stopped after 3 steps then resumed, with the same options."""
    from typer.testing import CliRunner

    app = engine_import("cli").app
    root = tmp_path_factory.mktemp("ckpt")
    seed = str(int(torch.randint(0, 2**31 - 1, (1,))))
    runner = CliRunner()

    def pretrain(name: str, *extra: str):
        res = runner.invoke(app, ["pretrain", *TRAIN, "--seed", seed, "--save-dir", str(root / name),
                                  "--log-file", str(root / f"{name}.jsonl"), *extra])
        assert res.exit_code == 0, res.output + res.stderr
        return res

    pretrain("straight", "--save-interval", "3")
    pretrain("split", "--exit-after-steps", "3")
    with (root / "split.jsonl").open("a") as f:  # as if the run had crashed after logging past its checkpoint
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n" + '{"step": 5, "lo')
    resumed = pretrain("split", "--resume")
    return root, resumed


def test_resume_is_bit_identical(runs):
    root, resumed = runs
    assert "resumed from" in resumed.output and "step_00000003" in resumed.output
    straight, split = read_jsonl(root / "straight.jsonl"), read_log(root / "split.jsonl")
    lines = (root / "split.jsonl").read_text().splitlines()
    assert len(lines) == 8 and lines[4] == '{"step": 5, "lo'  # appended: the crashed run's lines stay, the cut one alone
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]  # each step's last line
    for key in ("loss", "grad_norm", "lr", "valid_tokens"):
        assert [r[key] for r in straight] == [r[key] for r in split], key
    assert len({r["loss"] for r in straight}) == 6  # it trained: six different losses
    a, b = ckpt.load(root / "straight"), ckpt.load(root / "split")
    assert a.step == b.step == 6
    for part in ("master", "optim"):
        ta, tb = getattr(a, part), getattr(b, part)
        assert set(ta) == set(tb)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), part
    assert a.state["data"] == b.state["data"] and a.state["data"]["rows_consumed"] == 24


def test_checkpoint_layout_and_latest_pointer(runs):
    root, _ = runs
    save = root / "straight"
    assert (save / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in save.iterdir()) == ["config.toml", "latest", "step_00000003", "step_00000006"]
    step = save / "step_00000006"
    state = json.loads((step / "state.json").read_text())
    assert state["format"] == 4
    assert {"optimizer/.metadata", "optimizer/__0_0.distcp", "rng.safetensors", "tokenizer/tokenizer.json"} <= set(state["files"])
    assert set(state["checksums"]["files"]) == set(state["files"])
    assert state["config"]["train"]["num_steps"] == 6 and state["world_size"] == 1
    weights = ckpt.load(step).master  # the fp32 masters, whole, from the DCP shards
    assert "model.layers.1.mlp.down_proj.weight" in weights and all(w.dtype == torch.float32 for w in weights.values())
    assert list(weights["model.layers.1.mlp.down_proj.weight"].shape) == state["shapes"]["model.layers.1.mlp.down_proj.weight"]


def optimizer_of(loaded: ckpt.Checkpoint) -> AdamW:
    """An AdamW holding a loaded checkpoint's masters, moments and step count (one process, whole tensors)."""
    params = {n: torch.nn.Parameter(w.clone()) for n, w in loaded.master.items()}
    opt = AdamW(params, loaded.master, adamw_op=lambda *a, **k: None, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                master_dtype=torch.float32)
    opt.load(loaded.master, loaded.optim, loaded.step)
    return opt


def test_interrupted_save_keeps_the_last_good_checkpoint(runs, tmp_path, monkeypatch):
    root, _ = runs
    save, ctx = tmp_path / "save", DistContext()
    good = ckpt.load(root / "straight")
    opt = optimizer_of(good)
    ckpt.save(save, 6, opt, ctx, good.rng, {"identity": {}})
    again = ckpt.load(save)  # what was saved reads back bit for bit
    assert all(torch.equal(again.master[k], good.master[k]) for k in good.master)
    assert all(torch.equal(again.optim[k], good.optim[k]) for k in good.optim)
    before = sorted(p.name for p in save.iterdir())

    class Boom(RuntimeError):
        pass

    def fail(*_args, **_kwargs):
        raise Boom("disk full")

    monkeypatch.setattr(ckpt, "fsync", fail)  # dies after the files are written, before the rename
    with pytest.raises(Boom):
        ckpt.save(save, 7, opt, ctx, good.rng, {"identity": {}})
    assert sorted(p.name for p in save.iterdir()) == before  # no step_00000007, no leftover .tmp-*
    assert ckpt.find_latest(save).name == "step_00000006"


def test_hf_export_reproduces_the_engine_logits(runs, cli, tmp_path):
    transformers = pytest.importorskip("transformers")
    (MiniCPMConfig,) = engine_import("model_config", "MiniCPMConfig")
    (TextTokenizer,) = engine_import("data.tokenizer", "TextTokenizer")

    root, _ = runs
    out = tmp_path / "hf"
    res = cli(["export-hf", "--checkpoint", root / "straight", "--out", out])
    assert res.exit_code == 0, res.output + res.stderr
    loaded = ckpt.load(root / "straight")
    cfg = MiniCPMConfig(**loaded.state["config"]["model"])
    engine = model_holding(cfg, loaded.master)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        want, got = engine(ids), hf(input_ids=ids).logits
    assert got.shape == want.shape
    assert rel_err(want, got) <= HF_REL_TOL, rel_err(want, got)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "def f(x):\n    return x  # MiniCPM"
    assert tok(text, add_special_tokens=False)["input_ids"] == TextTokenizer(Path(out)).encode_batch([text])[0]
    assert tok.eos_token_id == TextTokenizer(Path(out)).eos_id


def test_resuming_a_finished_run_does_nothing(runs, cli):
    root, _ = runs
    save = root / "straight"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in save.rglob("*"))
    seed = ckpt.load(save).state["config"]["train"]["seed"]
    res = cli(["pretrain", *TRAIN, "--seed", seed, "--save-dir", save, "--resume"])
    assert res.exit_code == 0 and "nothing to train" in res.output
    assert sorted((p.name, p.stat().st_mtime_ns) for p in save.rglob("*")) == before


def write_old_format(source: Path, save: Path, fmt: int) -> Path:
    """The writers of formats 1-3, kept here to make old checkpoints: `source`'s step as it would have been saved
    then, with `latest` pointing at it. 1-2: rank 0 alone, whole safetensors files (2 adds checksums); 3: the
    optimizer state through DCP flattened to 1-D (as one process wrote it), each file's sha256."""
    loaded = ckpt.load(source)
    step = save / loaded.path.name
    step.mkdir(parents=True)
    parts = {"model.safetensors": loaded.master, "optimizer.safetensors": loaded.optim, "rng.safetensors": loaded.rng}
    if fmt == 3:
        flat = {f"master.{k}": v.reshape(-1) for k, v in loaded.master.items()} | {
            k: v.reshape(-1) for k, v in loaded.optim.items()}
        dcp.save(flat | {"step_count": torch.tensor(loaded.state["optimizer_steps"])},
                 checkpoint_id=str(step / "optimizer"), no_dist=True)
        parts = {"rng.safetensors": loaded.rng}
    for name, tensors in parts.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(step / name))
    shutil.copytree(loaded.path / "tokenizer", step / "tokenizer")
    files = {str(f.relative_to(step)): f for f in sorted(step.rglob("*")) if f.is_file()}
    state = {k: v for k, v in loaded.state.items() if k not in ("checksums", "shapes", "zero1")}
    state |= {"format": fmt, "files": {n: f.stat().st_size for n, f in files.items()}}
    if fmt == 3:
        state |= {"shapes": loaded.state["shapes"], "zero1": False, "checksums": {
            "algorithm": "sha256", "files": {n: checksums.file_digest(f) for n, f in files.items()}}}
    if fmt == 2:
        sums = {n: checksums.tensor_digests(t) for n, t in parts.items()}
        state["checksums"] = {"algorithm": "sha256", "files": sums | {n: checksums.file_digest(f) for n, f in files.items()
                                                                       if n not in parts}}
    (step / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    (save / "latest").write_text(step.name + "\n")
    return step


@pytest.mark.parametrize("fmt", [1, 2, 3])
def test_old_format_checkpoints_load_and_resume_bitwise(runs, cli, tmp_path, fmt):
    root, _ = runs
    save = tmp_path / "old"
    write_old_format(root / "straight" / "step_00000003", save, fmt)
    old, new = ckpt.load(save), ckpt.load(root / "straight" / "step_00000003")
    assert old.format == fmt and new.format == ckpt.FORMAT == 4
    for part in ("master", "optim", "rng"):
        assert all(torch.equal(getattr(old, part)[k], getattr(new, part)[k]) for k in getattr(new, part)), part
    res = cli(["pretrain", *TRAIN, "--seed", new.state["config"]["train"]["seed"], "--save-dir", save, "--resume"])
    assert res.exit_code == 0 and "resumed from" in res.output, res.output + res.stderr
    a, b = ckpt.load(root / "straight"), ckpt.load(save)
    assert b.format == 4 and a.step == b.step == 6
    for part in ("master", "optim"):
        assert all(torch.equal(getattr(a, part)[k], getattr(b, part)[k]) for k in getattr(a, part)), part
