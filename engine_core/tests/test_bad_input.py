"""Bad input: each case fails with a message naming the problem, a non-zero exit code, and no
checkpoint written (the save dir is left exactly as it was)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .core_testlib import engine_import
from .engine_fixture import MODEL, PACKAGE, SMALL_RUN

config = engine_import("config")
(to_toml,) = engine_import("core.run_config", "to_toml")
SMALL = engine_import("model_config").load(MODEL)
RUN = [*SMALL_RUN, "--num-steps", "1", "--global-batch-size", "2", "--micro-batch-size", "2"]


def snapshot(save: Path) -> list[str]:
    return sorted(str(p.relative_to(save)) for p in save.rglob("*")) if save.exists() else []


def check_fails(cli, save: Path, args: list, *needles: str, env: dict | None = None) -> str:
    before = snapshot(save)
    res = cli(["pretrain", *RUN, "--save-dir", save, *args], env=env)
    assert res.exit_code != 0, res.output
    assert "error: " in res.stderr, res.stderr
    message = res.stderr[res.stderr.index("error: "):]  # (datasets may print progress before it)
    for needle in needles:
        assert needle in message, (needle, message)
    assert snapshot(save) == before, "a failed run changed the save dir"
    return message


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A save dir with one good checkpoint (the small model, seq 32)."""
    from typer.testing import CliRunner

    app = engine_import("cli").app
    save = tmp_path_factory.mktemp("bad") / "good"
    res = CliRunner().invoke(app, ["pretrain", *RUN, "--save-dir", str(save)])
    assert res.exit_code == 0, res.output + res.stderr
    return save


def test_missing_dataset(cli, tmp_path):
    check_fails(cli, tmp_path / "s", ["--hf-dataset", tmp_path / "nowhere" / "data.jsonl"], "does not exist", "nowhere")


def test_empty_dataset_file(cli, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    check_fails(cli, tmp_path / "s", ["--hf-dataset", tmp_path / "empty.jsonl"], "empty.jsonl", "empty")


def test_dataset_whose_documents_are_all_empty(cli, tmp_path):
    (tmp_path / "blank.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("", "  ", "\n")))
    check_fails(cli, tmp_path / "s", ["--hf-dataset", tmp_path / "blank.jsonl"], "no text", "3 documents are empty")


def test_empty_dataset_directory(cli, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("not a data file")
    check_fails(cli, tmp_path / "s", ["--hf-dataset", tmp_path / "d"], "holds no Parquet, Arrow, JSON/JSONL or text files")


def test_template_naming_an_absent_field(cli, tmp_path):
    rows = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(4)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    msg = check_fails(cli, tmp_path / "s", ["--hf-dataset", tmp_path / "qa.jsonl", "--hf-text-template",
                                            "Question: {question}\\nAnswer: {response}"], "'response'")
    assert "question" in msg and "answer" in msg  # the columns it does have


def test_no_text_column_without_template(cli, tmp_path):
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    check_fails(cli, tmp_path / "s", ["--hf-dataset", tmp_path / "qa.jsonl"], "no 'text' column", "--hf-text-template")


def test_unreadable_tokenizer(cli, tmp_path):
    bad = tmp_path / "tok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"')
    check_fails(cli, tmp_path / "s", ["--tokenizer-path", bad], "cannot load the tokenizer", str(bad))
    check_fails(cli, tmp_path / "s", ["--tokenizer-path", tmp_path / "missing"], "is not a directory")


def test_global_batch_not_divisible(cli, tmp_path):
    before = snapshot(tmp_path / "s")
    res = cli(["pretrain", *SMALL_RUN, "--num-steps", "1", "--global-batch-size", "6", "--micro-batch-size", "4",
               "--save-dir", tmp_path / "s"])
    assert res.exit_code != 0 and "global_batch_size (6) is not a multiple of train.micro_batch_size (4)" in res.stderr
    assert snapshot(tmp_path / "s") == before


def test_sequence_longer_than_the_model_allows(cli, tmp_path):
    longest = SMALL.max_seq_length
    check_fails(cli, tmp_path / "s", ["--seq-length", 2 * longest], f"seq_length ({2 * longest}) exceeds",
                f"max_seq_length ({longest}")


def test_checkpoint_from_another_config(cli, trained, tmp_path):
    save = tmp_path / "copy"
    shutil.copytree(trained, save)
    check_fails(cli, save, ["--resume", "--seq-length", "16"], "different configuration", "seq_length: 32 -> 16")
    model = tmp_path / "wider.toml"
    hidden = SMALL.hidden_size
    wider = config.build(model=SMALL.model_copy(update={"hidden_size": 2 * hidden}), train=dict(seq_length=32))
    model.write_text(to_toml(wider, PACKAGE))  # a run config: --model reads its [model] table
    msg = check_fails(cli, save, ["--resume", "--model", model], "different configuration")
    assert f"model.hidden_size: {hidden} -> {2 * hidden}" in msg


def test_truncated_checkpoint_file(cli, trained, tmp_path):
    save = tmp_path / "copy"
    shutil.copytree(trained, save)
    step = save / (save / "latest").read_text().strip()
    weights = step / "optimizer" / "__0_0.distcp"  # the DCP shard holding the masters and moments
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size // 2)
    check_fails(cli, save, ["--resume", "--num-steps", "2"], "optimizer/__0_0.distcp", "truncated", str(size))
    res = cli(["export-hf", "--checkpoint", save, "--out", tmp_path / "hf"])
    assert res.exit_code != 0 and "truncated" in res.stderr and not (tmp_path / "hf").exists()


def test_existing_checkpoints_need_resume(cli, trained, tmp_path):
    check_fails(cli, trained, [], "already holds checkpoints", "--resume")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9", "FORGE_ENGINE_HUB_TIMEOUT_S": "3"}])
def test_unreachable_hub_dataset_fails_fast_naming_local_alternatives(cli, tmp_path, env):
    import time

    t0 = time.perf_counter()
    check_fails(cli, tmp_path / "s", ["--hf-dataset", "someone/some-corpus"], "someone/some-corpus",
                "local file or directory", "shipped default corpus", env=env)
    assert time.perf_counter() - t0 < 30
