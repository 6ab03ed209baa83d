"""core/sharded_state.py: the optimizer state through torch.distributed.checkpoint, resharded across world
sizes and ZeRO-1 layouts (gloo ranks under torchrun, small buckets so that ZeRO-1 pieces cut parameters).
Saved by 2 ZeRO-1 ranks after 2 steps, it loads bit for bit on 1 rank, on 2 ZeRO-1 ranks and on 2 plain
DP ranks (masters, moments, parameters, step count); saved again by 1 rank, it loads on 2 ZeRO-1 ranks. A
`pretrain` checkpoint of 2 ZeRO-1 ranks restores (checkpoint.restore) on 1 rank, 2 plain and 2 ZeRO-1 ranks with
the values `checkpoint.load` reads whole in one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .core_testlib import engine_env, engine_import, torchrun
from .engine_fixture import ENGINE, SMALL_RUN

ckpt = engine_import("core.checkpoint")

SCRIPT = '''
import importlib
import sys
from pathlib import Path
import torch
from safetensors.torch import save_file

sys.path.insert(0, sys.argv[6])  # the folder of engine_fixture.py: the engine under test
import engine_fixture as fixture

def engine(module):
    return importlib.import_module(f"{fixture.PACKAGE}.{module}")

config, ckpt, runtime, sharded_state = (engine(m) for m in ("config", "core.checkpoint", "core.runtime", "core.sharded_state"))
mode, src, dst, out, zero1 = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "zero1"
runtime.setup("cpu", True)
ctx = engine("core.dist").DistContext.start("cpu")
cfg = config.build(model=engine("model_config").load(fixture.MODEL), optim=dict(zero1=zero1, warmup_steps=1),
                   runtime=dict(device="cpu"),
                   train=dict(num_steps=4, global_batch_size=4, micro_batch_size=1, seq_length=16, bucket_mb=0.05))
trainer = fixture.build_trainer(cfg, ctx, torch.float32)
if mode == "train":
    gen, rows = torch.Generator().manual_seed(0), 4 // ctx.world
    for _ in range(2):
        tokens = torch.randint(0, cfg.model.vocab_size, (4, 17), generator=gen)[ctx.rank * rows : (ctx.rank + 1) * rows]
        trainer.train_step(tokens[:, :-1], tokens[:, 1:])
elif mode == "restore":
    ckpt.restore(ckpt.open_to_resume(Path(src), ctx), trainer)
else:
    sharded_state.load(src, trainer)
if dst != "-":
    sharded_state.save(dst, trainer)
opt = trainer.optimizer
whole = opt.master_weights() | opt.state_tensors()  # a collective
whole |= {f"param.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
if ctx.rank == 0:
    save_file(whole | {"step_count": torch.tensor(opt.step_count)}, out)
ctx.close()
'''


def _run(tmp_path, nproc: int, mode: str, src: str, dst: str, out: str, layout: str) -> dict[str, torch.Tensor]:
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
           mode, str(tmp_path / src), str(tmp_path / dst) if dst != "-" else "-", str(tmp_path / out), layout,
           str(Path(__file__).parent)]
    proc = subprocess.run(cmd, env=engine_env(), capture_output=True, text=True, timeout=240, cwd=ENGINE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(tmp_path / out))


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


@pytest.mark.slow
def test_optimizer_state_reshards_across_world_sizes(tmp_path):
    saved = _run(tmp_path, 2, "train", "-", "ck2", "saved.st", "zero1")
    assert int(saved["step_count"]) == 2 and saved["exp_avg_sq.model.norm.weight"].abs().sum() > 0
    _same(saved, _run(tmp_path, 1, "load", "ck2", "ck1", "one.st", "plain"))
    _same(saved, _run(tmp_path, 2, "load", "ck2", "-", "two_zero1.st", "zero1"))
    _same(saved, _run(tmp_path, 2, "load", "ck2", "-", "two_plain.st", "plain"))
    _same(saved, _run(tmp_path, 2, "load", "ck1", "-", "back.st", "zero1"))


@pytest.mark.slow
def test_a_zero1_pretrain_checkpoint_restores_on_other_layouts(tmp_path):
    proc = torchrun(2, ["pretrain", *SMALL_RUN, "--global-batch-size", "4", "--micro-batch-size", "1", "--bucket-mb", "0.05",
                        "--num-steps", "2", "--zero1", "--save-dir", tmp_path / "save"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole = ckpt.load(tmp_path / "save")  # one process, no process group
    assert whole.state["zero1"] and whole.state["world_size"] == 2
    want = whole.master | whole.optim
    for nproc, layout in ((1, "plain"), (2, "plain"), (2, "zero1")):
        got = _run(tmp_path, nproc, "restore", "save", "-", f"{nproc}{layout}.st", layout)
        assert int(got["step_count"]) == 2, (nproc, layout)
        assert all(torch.equal(got[k], want[k]) for k in want), (nproc, layout, [k for k in want if not torch.equal(got[k], want[k])][:5])
        assert all(torch.equal(got[f"param.{n}"], w) for n, w in whole.master.items()), (nproc, layout)
