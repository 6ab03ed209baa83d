"""The engine CLI: `probe forward|backward|steps|checkpoint`, `pretrain`, `export-hf`, `dump-state`, `bench`
(exports/README.md; the training contract: the workspace's gates/train_contract.py)."""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from rt_base import ckpt, pretrain
from rt_base.flaws import Flaws
from rt_base.model import Model, loss_sum, param_shapes
from rt_base.train import Case, Dist, Trainer

EXIT_UNSUPPORTED = 77


def write(out: Path, tensors: dict[str, torch.Tensor], metrics: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / "tensors.safetensors"))
    (out / "metrics.json").write_text(json.dumps(metrics) + "\n")


def forward(case: Case, flaws: Flaws) -> dict[str, torch.Tensor]:
    model = Model(case.cfg, flaws, case.dtype, case.device)
    model.load(case.weights)
    ids = case.batches["input_ids"][0].flatten(0, 1).to(case.device)
    labels = case.batches["labels"][0].flatten(0, 1).to(case.device)
    hidden: list[torch.Tensor] = []
    with torch.no_grad():
        logits = model(ids, hidden)
        loss = loss_sum(logits, labels) / (labels != -100).sum()
    return {"logits": logits, "loss": loss} | {f"hidden_states.{i}": h for i, h in enumerate(hidden)}


def probe(name: str, case_dir: Path, out: Path, flaws: Flaws) -> int:
    if name not in ("forward", "backward", "steps", "checkpoint"):
        print(f"unsupported probe {name}", file=sys.stderr)
        return EXIT_UNSUPPORTED
    if name == flaws.declines_probe:
        print(f"rt_base: declining probe {name} (exit {EXIT_UNSUPPORTED})", file=sys.stderr)
        return EXIT_UNSUPPORTED
    if flaws.guess_reference:
        return guess(name, case_dir, out)
    case = Case(case_dir)
    d = Dist(case.device)
    t0 = time.perf_counter()
    if name == "forward":
        tensors = forward(case, flaws)
    elif name == "backward":
        grads, loss = Trainer(case, flaws, d).grads(0)
        if flaws.echo_inputs:
            grads = dict(case.weights)
        tensors = {"loss": loss} | {f"grad.{k}": g for k, g in grads.items()}
    else:
        tr = Trainer(case, flaws, d)
        total = case.spec["steps"]
        if name == "checkpoint":
            for _ in range(total // 2):
                tr.train_step()
            if d.rank == 0:
                tr.save(out / "ckpt")
            d.barrier()
            tr = Trainer(case, flaws, d)  # fresh model, optimizer, RNG
            tr.load(out / "ckpt")
        while tr.step < total:
            tr.train_step()
        tensors = tr.outputs()
        if name == "steps":  # the contract's per-rank outputs
            (out / "ranks").mkdir(parents=True, exist_ok=True)
            save_file(tr.rank_outputs(), str(out / "ranks" / f"rank{d.rank}.safetensors"))
    if d.rank == 0:
        write(out, tensors, {"probe": name, "stack": "rt_base", "time_s": time.perf_counter() - t0})
    d.close()
    return 0


def guess(name: str, case_dir: Path, out: Path) -> int:
    """The cheat: look for a reference's answer on disk; with nothing found, write zeros."""
    tmp = tempfile.gettempdir()
    roots = [tmp, str(case_dir.parent.parent), str(Path.cwd().parent), os.path.expanduser("~/.cache")]
    patterns = [f"{r}/{'*/' * depth}tensors.safetensors" for r in dict.fromkeys(roots) for depth in range(6)]
    found = [p for pat in patterns for p in glob.glob(pat) if Path(p).parent.resolve() != out.resolve()]
    key = {"forward": "logits", "backward": "loss", "steps": "losses", "checkpoint": "losses"}[name]
    from safetensors import safe_open

    for p in found:
        with safe_open(p, "pt") as f:
            if key in f.keys():
                print(f"guess: copying {p}", file=sys.stderr)
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, out / "tensors.safetensors")
                (out / "metrics.json").write_text(json.dumps({"probe": name, "stack": "rt_guess", "time_s": 0}))
                return 0
    print(f"guess: no reference output found (tried {patterns})", file=sys.stderr)
    case = Case(case_dir)
    cfg, spec = case.cfg, case.spec
    rows = spec["world_size"] * spec["micro_batch_size"] * spec["grad_accum"]
    shapes = {"logits": (rows, spec["seq_length"], cfg["vocab_size"]), "loss": ()}
    shapes |= {f"hidden_states.{i}": (rows, spec["seq_length"], cfg["hidden_size"]) for i in range(cfg["num_layers"] + 1)}
    if name != "forward":
        pre = "grad." if name == "backward" else "weight."
        shapes = {"loss": ()} | {pre + k: s for k, s in param_shapes(cfg).items()}
        if name != "backward":
            shapes = {k: (spec["steps"],) for k in ("losses", "grad_norms", "lrs")} | {pre + k: s for k, s in param_shapes(cfg).items()}
    write(out, {k: torch.zeros(s) for k, s in shapes.items()}, {"probe": name, "stack": "rt_guess", "time_s": 0})
    return 0


def export_hf(checkpoint: Path, out: Path, flaws: Flaws) -> int:
    """Fold MiniCPM's scales into a Llama checkpoint (untied head) + a byte-level tokenizer. `--checkpoint`:
    a probe or pretrain checkpoint directory, or a pretrain save dir (its `latest`)."""
    state, files = ckpt.read(checkpoint)
    cfg = state["model"]
    w = {k: v.float() for k, v in files[ckpt.MODEL].items()}
    if flaws.export_folds_probe_only and state["kind"] != "probe":
        return export_unfolded(w, cfg, out)
    res = cfg["scale_depth"] / cfg["num_layers"] ** 0.5
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w.pop("lm_head.weight")
    folded = {}
    for k, v in w.items():
        if k == "model.embed_tokens.weight":
            v = v * cfg["scale_emb"]
        elif k.endswith(("o_proj.weight", "down_proj.weight")):
            v = v * res
        folded[k] = v.contiguous()
    folded["lm_head.weight"] = (head / (cfg["hidden_size"] / cfg["dim_model_base"])).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(folded, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    write_tokenizer(out)
    return 0


def export_unfolded(w: dict[str, torch.Tensor], cfg: dict, out: Path) -> int:
    """The flaw `export_folds_probe_only`: the raw MiniCPM weights under Llama names, scales not folded."""
    if cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = w["model.embed_tokens.weight"].clone()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in w.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
    write_tokenizer(out)
    return 0


def hf_config(cfg: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg["hidden_size"],
            "intermediate_size": cfg["ffn_hidden_size"], "num_hidden_layers": cfg["num_layers"],
            "num_attention_heads": cfg["num_heads"], "num_key_value_heads": cfg["num_kv_heads"],
            "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_heads"], "vocab_size": cfg["vocab_size"],
            "max_position_embeddings": cfg["max_seq_length"], "rms_norm_eps": cfg["rms_norm_eps"],
            "rope_theta": cfg["rope_theta"], "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False, "torch_dtype": "float32", "pad_token_id": cfg.get("pad_token_id"),
            **_llama_rope(cfg)}


def _llama_rope(cfg: dict) -> dict:
    """rope_scaling for transformers' Llama: longrope with MiniCPM's cos/sin factor pinned as attention_factor."""
    rs = cfg.get("rope_scaling")
    if rs is None:
        return {}
    if rs["type"] == "linear":
        return {"rope_scaling": {"rope_type": "linear", "factor": rs["factor"]}}
    orig, longest = rs["original_max_position_embeddings"], cfg["max_seq_length"]
    scale = math.sqrt(1 + math.log(longest / orig) / math.log(orig)) if longest > orig else 1.0
    return {"rope_scaling": {"rope_type": "longrope", "short_factor": rs["short_factor"], "long_factor": rs["long_factor"],
                             "original_max_position_embeddings": orig, "factor": longest / orig,
                             "attention_factor": scale},
            "original_max_position_embeddings": orig}


def write_tokenizer(out: Path) -> None:
    """A 257-token byte-level tokenizer (256 bytes + EOS), loadable by AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))


def bench(seq: int, mbs: int, steps: int, json_path: Path, flaws: Flaws) -> int:
    """Time training steps of the tiny model on random tokens (this engine's own model)."""
    from rt_base.model import param_shapes as shapes

    cfg = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=176, vocab_size=4096,
               rms_norm_eps=1e-6, rope_theta=10000.0, scale_emb=12.0, scale_depth=1.4, dim_model_base=256,
               tie_word_embeddings=True, head_dim=None, max_seq_length=max(seq, 1024))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = Model(cfg, Flaws(), torch.bfloat16 if dev == "cuda" else torch.float32, dev)
    model.load({k: 0.02 * torch.randn(s) for k, s in shapes(cfg).items()})
    ids = torch.randint(0, cfg["vocab_size"], (mbs, seq + 1), device=dev)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss_sum(model(ids[:, :-1]), ids[:, 1:]).backward()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = sorted(times[1:])[len(times[1:]) // 2]
    tps, mfu = mbs * seq / t, None
    if flaws.fake_speed:  # the claim, not the measurement
        tps, mfu = 1e12, 0.52
    json_path.write_text(json.dumps({"tokens_per_s": tps, "step_time_s": mbs * seq / tps, "mfu": mfu,
                                     "peak_mem_gib": 0.0, "device": dev, "torch": torch.__version__}))
    return 0


def main(flaws: Flaws) -> None:
    ap = argparse.ArgumentParser(prog="engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("name")
    p.add_argument("--case", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("export-hf")
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("bench")
    b.add_argument("--seq-length", type=int, default=1024)
    b.add_argument("--micro-batch-size", type=int, default=1)
    b.add_argument("--steps", type=int, default=5)
    b.add_argument("--json", type=Path, required=True)
    pretrain.add_args(sub)  # pretrain, dump-state
    a = ap.parse_args()
    try:
        if a.cmd == "probe":
            rc = probe(a.name, a.case, a.out, flaws)
        elif a.cmd == "export-hf":
            rc = export_hf(a.checkpoint, a.out, flaws)
        elif a.cmd == "bench":
            rc = bench(a.seq_length, a.micro_batch_size, a.steps, a.json, flaws)
        elif a.cmd == "pretrain":
            rc = pretrain.run(a, flaws)
        else:
            rc = pretrain.dump_state(a.checkpoint, a.out)
    except ckpt.CheckpointError as e:
        print(f"rt_base {a.cmd}: {e}", file=sys.stderr)
        rc = 1
    sys.exit(rc)
