"""The run config and strictness: `pretrain --config run.toml` (command-line options override it, the resolved
config is written beside the checkpoints), options derived from the config, strict types, export-hf's
--force, the warmup warning, seeded generators, metrics sinks, step timing."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import time
import tomllib
import types

import pytest
import torch
from safetensors.torch import load_file

from .core_testlib import engine_import, read_jsonl
from .engine_fixture import MODEL, SMALL_RUN

config = engine_import("config")
ckpt, cli_options, run_config = engine_import("core", "checkpoint", "cli_options", "run_config")
PRESETS, load = engine_import("model_config", "PRESETS", "load")
SMALL = load(MODEL)
A_PRESET = next(iter(PRESETS))  # for [model] tables refused before a model is built

RUN = [*SMALL_RUN, "--global-batch-size", "2", "--micro-batch-size", "2"]
RUN_TOML = f"""\
model = "{MODEL}"
[train]
num_steps = 2
global_batch_size = 2
micro_batch_size = 2
seq_length = 32
seed = 5
[optim]
lr = 3e-3
warmup_steps = 1
lr_schedule = "cosine"
[runtime]
device = "cpu"
"""


@pytest.mark.slow
def test_config_file_with_command_line_overrides_and_the_resolved_config(cli, tmp_path):
    (tmp_path / "run.toml").write_text(RUN_TOML)
    save = tmp_path / "save"
    res = cli(["pretrain", "--config", tmp_path / "run.toml", "--num-steps", "3", "--save-dir", save,
               "--log-file", tmp_path / "a.jsonl"])
    assert res.exit_code == 0, res.output + res.stderr
    assert [r["step"] for r in read_jsonl(tmp_path / "a.jsonl")] == [1, 2, 3]  # the option beat the file's 2
    written = tomllib.loads((save / "config.toml").read_text())
    assert written["train"]["num_steps"] == 3 and written["train"]["seed"] == 5 and written["optim"]["lr"] == 3e-3
    assert written["model"]["name"] == SMALL.name and written["optim"]["lr_schedule"] == "cosine"
    assert ckpt.load(save).state["config"] == json.loads(config.build(
        model=run_config.model_from(written["model"], "x", PRESETS), ops=run_config.ops_from(written["ops"], "x"),
        **{s: written[s] for s in run_config.SECTIONS}).model_dump_json())  # the file is the checkpoint's config

    # the written file is itself a --config: the same run again, bit for bit
    res = cli(["pretrain", "--config", save / "config.toml", "--save-dir", tmp_path / "again", "--no-resume",
               "--log-file", tmp_path / "b.jsonl"])
    assert res.exit_code == 0, res.output + res.stderr
    assert [r["loss"] for r in read_jsonl(tmp_path / "a.jsonl")] == [r["loss"] for r in read_jsonl(tmp_path / "b.jsonl")]


@pytest.mark.parametrize("text,needle", [
    (f'model = "{MODEL}"\n[train]\nnum_steps = true\n', "train.num_steps: Input should be a valid integer"),
    (f'model = "{MODEL}"\n[optim]\nzero1 = 1\n', "optim.zero1: Input should be a valid boolean"),
    (f'model = "{MODEL}"\n[train]\nnum_step = 3\n', "train.num_step: Extra inputs are not permitted"),
    (f'model = "{MODEL}"\n[trian]\n', "unknown key 'trian'"),
    (f'[model]\npreset = "{A_PRESET}"\nnum_layers = true\n', "num_layers: Input should be a valid integer"),
    (f'model = "{MODEL}"\n[train\n', "not valid TOML"),
], ids=["num_steps", "zero1", "num_step", "trian", "num_layers", "toml"])
def test_config_files_are_strict(cli, tmp_path, text, needle):
    (tmp_path / "run.toml").write_text(text)
    res = cli(["pretrain", "--config", tmp_path / "run.toml", "--device", "cpu"])
    assert res.exit_code == 1 and needle in res.stderr, res.stderr


def test_model_toml_types_are_strict(cli, tmp_path):
    (tmp_path / "m.toml").write_text(f'[model]\npreset = "{A_PRESET}"\nnum_layers = true\n')
    res = cli(["pretrain", *RUN, "--num-steps", "1", "--model", tmp_path / "m.toml"])
    assert res.exit_code == 1 and "num_layers: Input should be a valid integer" in res.stderr, res.stderr
    (tmp_path / "m.toml").write_text(f'[model]\npreset = "{A_PRESET}"\nscale_emb = 12\n')  # an int fills a float field
    model = run_config.model_from(str(tmp_path / "m.toml"), "m", PRESETS)
    assert config.build(model=model, train=dict(seq_length=32)).model.scale_emb == 12.0


def test_every_config_field_is_an_option_of_pretrain():
    import typer.main

    command = typer.main.get_command(engine_import("cli").app).commands["pretrain"]
    flags = {flag for p in command.params if not getattr(p, "hidden", False) for flag in (*p.opts, *p.secondary_opts)}
    for name, (section, info) in cli_options.fields().items():
        flag = "--" + name.replace("_", "-")
        assert flag in flags, flag
        assert info.description, f"{section}.{name} has no description (the option's help)"
    contract = ["--init-from", "--token-batches", "--num-steps", "--global-batch-size", "--micro-batch-size", "--seq-length",
                "--lr", "--min-lr", "--warmup-steps", "--lr-schedule", "--decay-steps", "--weight-decay", "--grad-clip",
                "--bucket-mb", "--seed", "--device", "--save-dir", "--save-interval", "--resume", "--exit-after-steps",
                "--log-file", "--config", "--model", "--ops", "--summary-json", "--no-deterministic", "--no-cuda-graph"]
    assert set(contract) <= flags, set(contract) - flags


@pytest.mark.slow
def test_export_hf_refuses_a_non_empty_out_unless_forced(cli, tmp_path):
    res = cli(["pretrain", *RUN, "--num-steps", "1", "--save-dir", tmp_path / "save"])
    assert res.exit_code == 0, res.output + res.stderr
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = cli(["export-hf", "--checkpoint", tmp_path / "save", "--out", out])
    assert res.exit_code == 1 and "is not empty" in res.stderr and "--force" in res.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    res = cli(["export-hf", "--checkpoint", tmp_path / "save", "--out", out, "--force"])
    assert res.exit_code == 0 and (out / "config.json").is_file() and not (out / "notes.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(["export-hf", "--checkpoint", tmp_path / "save", "--out", empty]).exit_code == 0


@pytest.mark.slow
def test_warmup_longer_than_the_run_warns_in_one_line(cli):
    res = cli(["pretrain", *RUN, "--num-steps", "2", "--warmup-steps", "5"])
    assert res.exit_code == 0, res.output + res.stderr
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: --warmup-steps 5 >= --num-steps 2: the learning rate never reaches --lr 0.003"]
    assert "warning" not in cli(["pretrain", *RUN, "--num-steps", "3", "--warmup-steps", "2"]).stderr


def test_generators_start_from_the_seed(cli, tmp_path):
    seed = random.randint(0, 2**31 - 1)
    res = cli(["pretrain", *RUN, "--num-steps", "1", "--seed", seed, "--save-dir", tmp_path / "save"])
    assert res.exit_code == 0, res.output + res.stderr
    step = ckpt.find_latest(tmp_path / "save")
    saved = load_file(str(step / "rng.safetensors"))["rank0.torch_cpu"]
    assert torch.equal(saved, torch.Generator().manual_seed(seed).get_state())  # nothing in the step draws from it
    random.seed(seed)
    assert json.loads((step / "state.json").read_text())["python_rng"][0][1] == list(random.getstate()[1])


class FakeSummaryWriter:
    """torch.utils.tensorboard.SummaryWriter's calls the sink makes, recorded."""

    made: list["FakeSummaryWriter"] = []

    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        FakeSummaryWriter.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_sink_logs_every_step(cli, tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    FakeSummaryWriter.made.clear()
    monkeypatch.setenv("FORGE_ENGINE_PEAK_TFLOPS", "1")  # a CPU peak given: MFU is reported
    res = cli(["pretrain", *RUN, "--num-steps", "3", "--tensorboard-dir", tmp_path / "tb", "--log-file", tmp_path / "l.jsonl"])
    assert res.exit_code == 0, res.output + res.stderr
    (writer,) = FakeSummaryWriter.made
    assert writer.log_dir == str(tmp_path / "tb") and writer.closed
    tags = {tag for tag, _, _ in writer.scalars}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "train/peak_mem_gib"} <= tags
    losses = [(value, step) for tag, value, step in writer.scalars if tag == "train/loss"]
    assert losses == [(r["loss"], r["step"]) for r in read_jsonl(tmp_path / "l.jsonl")]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed here")
def test_tensorboard_missing_is_a_clear_error(cli, tmp_path):
    res = cli(["pretrain", *RUN, "--num-steps", "1", "--tensorboard-dir", tmp_path / "tb", "--save-dir", tmp_path / "s"])
    assert res.exit_code == 1 and "pip install tensorboard" in res.stderr, res.stderr
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_wandb_sink_only_when_asked_and_installed(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: `import wandb` raises ImportError
    res = cli(["pretrain", *RUN, "--num-steps", "1", "--wandb-project", "p"])
    assert res.exit_code == 1 and "pip install wandb" in res.stderr, res.stderr

    logged, run = [], types.SimpleNamespace(finished=False)
    run.log = lambda values, step: logged.append((step, values))
    run.finish = lambda: setattr(run, "finished", True)
    fake = types.ModuleType("wandb")
    fake.init = lambda project, config: (setattr(run, "project", project), setattr(run, "config", config), run)[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    res = cli(["pretrain", *RUN, "--num-steps", "2", "--wandb-project", "p"])
    assert res.exit_code == 0, res.output + res.stderr
    assert run.project == "p" and run.config["train"]["num_steps"] == 2 and run.finished
    assert [step for step, _ in logged] == [1, 2] and "train/loss" in logged[0][1]
    assert "train/mfu" not in logged[0][1]  # the CPU without a peak: no MFU, rather than one against a GPU's peak
    assert "mfu=n/a" in res.output


@pytest.mark.slow
def test_every_step_time_is_its_own_the_last_included(cli, tmp_path, monkeypatch):
    (Trainer,) = engine_import("core.trainer", "Trainer")
    real, delay = Trainer.train_step, 0.15

    def slow_step(self, ids, labels):
        res = real(self, ids, labels)
        time.sleep(delay)  # the step takes at least this long
        return res

    monkeypatch.setattr(Trainer, "train_step", slow_step)
    t0 = time.perf_counter()
    res = cli(["pretrain", *RUN, "--num-steps", "4", "--log-file", tmp_path / "l.jsonl", "--save-dir", tmp_path / "s",
               "--save-interval", "2"])
    wall = time.perf_counter() - t0
    assert res.exit_code == 0, res.output + res.stderr
    times = [r["step_time_s"] for r in read_jsonl(tmp_path / "l.jsonl")]
    assert len(times) == 4 and all(delay <= t < delay + 1.0 for t in times), times
    assert sum(times) < wall


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_times_on_a_gpu_when_the_host_sees_completions_late():
    """The host is held inside each step until the device finishes it, so it reads step N only once step N+1 is
    done: host time would give the last step ~0 ms. Device events give every step its ~0.1 s."""
    (DistContext,) = engine_import("core.dist", "DistContext")
    (StepLog,) = engine_import("core.metrics", "StepLog")
    (StepReports,) = engine_import("core.step_reports", "StepReports")
    (StepResult,) = engine_import("core.trainer", "StepResult")

    cfg = config.build(model=SMALL, train=dict(seq_length=32, global_batch_size=2, micro_batch_size=2))
    reports = StepReports(cfg, DistContext(device=torch.device("cuda", torch.cuda.current_device())), StepLog([], False, 4, 0))
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles = int(10_000_000 * 0.1 / (start.elapsed_time(end) / 1e3))  # ~0.1 s of spinning
    for step in range(4):
        torch.cuda._sleep(cycles)
        one = torch.ones((), device="cuda")
        res = StepResult(one * 2.5, one * 0.5, 1e-3, one.long() * 64)
        torch.cuda.synchronize()  # the host is held until the device is done with this step
        reports.hold(step, res)
    reports.flush()
    assert len(reports.times) == 4 and all(0.08 < t < 0.2 for t in reports.times), reports.times
