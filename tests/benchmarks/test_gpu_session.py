"""The GPU session dispatcher on the CPU: every part's dry run, arguments checked before anything runs, the ab
part's runs equal to what the old `AB=` string gave, and the runner's folder / log / bundle contract."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from benchmarks.gpu import session
from benchmarks.gpu.session_parts import PARTS
from benchmarks.gpu.session_steps import argv_lists
from benchmarks.gpu.session_steps import Context, Plan, run_part, step

ROOT = Path(__file__).resolve().parents[2]
SESSION_SH = ROOT / "benchmarks/gpu/session.sh"
MINIMAL = {"ab": ["--variant", "base"]}  # a part's required options, where it has any


def _plans(words: list[str], out: Path) -> list:
    return session.plans(session.parse(["--out", str(out), *words]), env={"PYTHONPATH": "/carried"})


def test_every_part_plans_commands_inside_its_folder_and_scripts_that_exist(tmp_path: Path, capsys) -> None:
    for name in PARTS:
        [(part, plan, ctx)] = _plans([name, *MINIMAL.get(name, [])], tmp_path)
        assert part == name and plan.steps
        for s in plan.steps:
            assert s.argv and s.command()[-len(s.argv):] == list(s.argv)
            for w in s.argv:  # every script it names is in the tree
                if re.fullmatch(r"[\w./-]+\.(py|sh)", w) and not w.startswith("/"):
                    assert (ROOT / w).is_file(), (name, w)
            mods = [s.argv[i + 1] for i, w in enumerate(s.argv[:-1]) if w == "-m" and s.argv[i + 1].startswith("bench")]
            assert all((ROOT / (m.replace(".", "/") + ".py")).is_file() for m in mods), mods
            paths = [w for w in s.argv if w.startswith(str(tmp_path))]
            paths += [v for v in s.env.values() if str(tmp_path) in v]
            assert all(p.startswith(str(tmp_path / name)) for p in paths), (name, paths)
    every = [w for n in PARTS for w in ("--", n, *MINIMAL.get(n, []))][1:]
    assert session.main(["--out", str(tmp_path), "--dry-run", *every]) == 0
    printed = capsys.readouterr().out
    assert all(f"[{n}] -> " in printed for n in PARTS)
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_forwarded_options_reach_the_scripts_that_take_them(tmp_path: Path) -> None:
    for name, part in PARTS.items():
        for o in (o for o in part.opts if o.forward):
            f, kw = o.flags[0], o.kwargs
            value = [] if kw.get("action") == "store_true" else [str((kw.get("choices") or [kw["type"](1)])[0])]
            [(_, plan, _)] = _plans([name, *MINIMAL.get(name, []), f, *value], tmp_path)
            [s] = [s for s in plan.steps if f in s.argv]
            assert list(s.argv[s.argv.index(f) + 1:][:len(value)]) == value
            script = (s.argv[s.argv.index("-m") + 1].replace(".", "/") + ".py" if "-m" in s.argv
                      else next(w for w in s.argv if w.endswith(".py")))
            src = (ROOT / script).read_text()
            assert f'"{f}"' in src or f'"{f[2:]}"' in src, (name, f, script)


def test_m5_without_its_bench_runs_the_gate_alone(tmp_path: Path) -> None:
    [(_, with_bench, _)] = _plans(["m5"], tmp_path)
    [(_, gate_only, _)] = _plans(["m5", "--no-bench"], tmp_path)
    assert [s.argv[2] for s in with_bench.steps] == ["train_engine_0_5b", "benchmarks.gpu.gate_stage"]
    assert [s.argv for s in gate_only.steps] == [with_bench.steps[1].argv]


def test_m5_on_the_8b_runs_the_8bs_bench_on_the_cases_model(tmp_path: Path) -> None:
    """The 8B's gate-timed figure beside its own bench in the same call: its micro batch, the case's model TOML."""
    [(_, plan, _)] = _plans(["m5", "--engine", "exports/train_engine_8b", "--case", "minicpm4-8b-8l",
                             "--speed-micro-batch-size", "2", "--speed-global-batch-size", "2"], tmp_path)
    bench, gate = plan.steps
    assert bench.argv[2] == "train_engine_8b" and "benchmarks/models/minicpm4-8b-8l.toml" in bench.argv
    assert bench.argv[bench.argv.index("--micro-batch-size") + 1] == "2" and bench.argv[-1].endswith("bench_mb2.json")
    assert bench.env["PYTHONPATH"].startswith(f"{ROOT}/exports/train_engine_8b/src")
    assert gate.argv[gate.argv.index("--engine") + 1] == "exports/train_engine_8b"


@pytest.mark.parametrize("part", ["compare", "agreement"])
def test_a_scripts_budget_sets_its_kill(part: str, tmp_path: Path) -> None:
    """compare_0.5b.sh keeps to BUDGET_S: the part's kill comes after it, whatever the budget (never a fixed 360 s)."""
    [(_, plan, _)] = _plans([part, "--budget-s", "500"], tmp_path)
    [s] = plan.steps
    assert s.env["BUDGET_S"] == "500" and s.timeout_s == 530


@pytest.mark.parametrize("words, message", [
    (["kernels", "bogus"], "unknown part 'bogus'"),
    (["kernels", "--budget", "9"], "unrecognized arguments: --budget"),
    (["ab", "--variant", "a", "stage"], "a `--` goes before the next part"),
    (["ab", "--ops", "attention=sdpa"], "comes after the --variant"),
    (["ab", "--variant", "a", "--env", "notanassignment"], "expected NAME=VALUE"),
    (["ab", "--variant", "fa4_x"], "needs --fa4-launch"),
    (["ab", "--variant", "a", "--variant", "a"], "given twice"),
    (["stage", "--seq-length", "long"], "invalid int value"),
    (["--"], "expected a part name"),
    (["m5", "--timeout-s", "330", "--gate-timeout-s", "320"], "less than 30 s to write its report"),
    (["stage", "--timeout-s", "230", "--gate-timeout-s", "220"], "less than 30 s to write its report"),
    (["m5", "--engine", "exports/train_engine_8b"], "or --no-bench"),
    (["stage", "--engine", "exports/train_engine_8B"], "invalid choice"),
])
def test_a_bad_word_fails_before_anything_runs(words, message, tmp_path: Path, capsys, monkeypatch) -> None:
    ran: list[str] = []
    monkeypatch.setattr(session, "run_part", lambda name, *a: ran.append(name))
    with pytest.raises(SystemExit) as e:
        session.main(["--out", str(tmp_path), "wgrad", "--", *words])
    assert e.value.code == 2 and message in capsys.readouterr().err and not ran


def test_an_old_environment_knob_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("GEMM_ARGS", "--sites o.fwd")
    with pytest.raises(SystemExit):
        session.parse(["--out", str(tmp_path), "gemms"])
    assert "GEMM_ARGS (now: gemms --sites" in capsys.readouterr().err


def test_session_sh_has_no_eval_and_checks_its_words_before_the_set_up(tmp_path: Path) -> None:
    text = SESSION_SH.read_text()
    assert not re.search(r"\beval\b", text) and "exec python3 -m benchmarks.gpu.session" in text
    assert text.index("--check-only") < text.index("pip install")
    path = os.environ["PATH"]  # the python3 that runs the tests
    bad = subprocess.run(["bash", str(SESSION_SH), "nosuchpart"], capture_output=True, text=True,
                         env={"PATH": path, "OUT": str(tmp_path)}, timeout=60)
    assert bad.returncode == 2 and "unknown part" in bad.stderr and not bad.stdout
    helped = subprocess.run(["bash", str(SESSION_SH), "--help"], capture_output=True, text=True,
                            env={"PATH": path}, timeout=60)
    assert helped.returncode == 0 and all(f"  {n} " in helped.stdout for n in PARTS)


# The old session.sh's ab arm, verbatim but for `timeout`, which prints the command it was given.
OLD_AB = r'''
timeout() { printf '%s\037' "$@"; printf '\036'; }
a="--seq-length 4096 --steps ${AB_STEPS:-8} --warmup 3 --micro-batch-size ${MBS:-8} --compile"
IFS=';' read -ra abs <<< "${AB:?AB=name:ops[:VAR=value ...];...}"
for r in $(seq "${ROUNDS:-1}"); do for v in "${abs[@]}"; do IFS=':' read -r n o vars <<< "$v"
    run=(python3 -m train_engine_0_5b bench)
    [[ "$n" == fa4_* ]] && run=(python3 benchmarks/gpu/bench_fa4_launch.py "${FA4_LAUNCH:?}")
    cmd=(env $vars "${run[@]}" $a ${o:+--ops "$o"} --json "$dir/${n}_r$r.json")
    if [ "${AB_CODE:-0}" = 1 ] && [ ! -f "$dir/output_code.txt" ]; then
      TORCH_LOGS=output_code timeout 240 "${cmd[@]}" 2> "$dir/output_code.txt"
    else timeout ${AB_TIMEOUT:-200} "${cmd[@]}"; fi
done; done
'''


def _old_ab(env: dict[str, str], d: Path) -> list[tuple[int, list[str], list[str], bool]]:
    """(timeout, VAR=value words, argv, dumps code) per run of the old arm."""
    d.mkdir(parents=True)
    out = subprocess.run(["bash", "-c", OLD_AB], env={"PATH": "/usr/bin:/bin", "dir": str(d), **env},
                         capture_output=True, text=True, check=True).stdout
    runs = []
    for rec in filter(None, out.split("\036")):
        words = rec.split("\037")[:-1]
        limit, rest = int(words[0]), words[2:]  # words[1] is `env`
        k = next(i for i, w in enumerate(rest) if w == "python3")
        runs.append((limit, rest[:k], rest[k:], limit == 240 and env.get("AB_CODE") == "1" and not runs))
    return runs


def _new_ab(words: list[str], out: Path) -> list[tuple[int, list[str], list[str], bool]]:
    [(_, plan, _)] = _plans(["ab", *words], out)
    runs = []
    for s in plan.steps:
        own = [f"{k}={v}" for k, v in s.env.items() if k not in ("PYTHONPATH", "TORCH_LOGS")]
        assert s.env["PYTHONPATH"] == f"{ROOT}/exports/train_engine_0.5B/src:/carried"
        runs.append((s.timeout_s, own, list(s.argv), s.env.get("TORCH_LOGS") == "output_code"))
    return runs


@pytest.mark.parametrize("old, new", [
    ({"AB": "sdpa:attention=sdpa;fa4:attention=flash4;default::TORCHINDUCTOR_A=1 TORCHINDUCTOR_B=0",
      "ROUNDS": "2", "MBS": "12", "AB_STEPS": "6", "AB_CODE": "1"},
     ["--rounds", "2", "--micro-batch-size", "12", "--steps", "6", "--code", "--variant", "sdpa", "--ops",
      "attention=sdpa", "--variant", "fa4", "--ops", "attention=flash4", "--variant", "default",
      "--env", "TORCHINDUCTOR_A=1", "--env", "TORCHINDUCTOR_B=0"]),
    ({"AB": "fa4_ovl:attention=flash4;base:attention=flash4:TORCH_X=a=b", "AB_TIMEOUT": "150",
      "FA4_LAUNCH": '{"fwd_intra_wg_overlap": false}'},
     ["--timeout-s", "150", "--fa4-launch", '{"fwd_intra_wg_overlap": false}', "--variant", "fa4_ovl", "--ops",
      "attention=flash4", "--variant", "base", "--ops", "attention=flash4", "--env", "TORCH_X=a=b"]),
])
def test_ab_variants_run_what_the_old_ab_string_ran(old, new, tmp_path: Path) -> None:
    want = _old_ab(old, tmp_path / "ab")
    got = _new_ab(new, tmp_path)
    assert got == want and len(got) == len(old["AB"].split(";")) * int(old.get("ROUNDS", "1"))


def test_a_part_runs_into_its_folder_and_comes_back_as_one_bundle(tmp_path: Path, capsys) -> None:
    ctx = Context(root=ROOT, out=tmp_path, env={})
    d = ctx.part_dir("demo")
    result = d / "x_r1.json"
    plan = Plan((step("bash", "-c", f"echo hello; echo oops >&2; printf '{{\\n\"tokens_per_s\": 5\\n}}' > {result}",
                      timeout_s=30, env={"DEMO": "1"}, note="[demo] x: exit {rc}", json_summary=result),
                 step("bash", "-c", "echo $DEMO-unset; exit 3", timeout_s=30)))
    assert run_part("demo", plan, ctx) == 3
    printed = capsys.readouterr().out
    assert "[demo] exit 3 in " in printed and "[demo] x: exit 0" in printed
    assert not d.exists() and [p.name for p in tmp_path.iterdir()] == ["demo.tgz"]
    with tarfile.open(tmp_path / "demo.tgz") as tar:
        log = tar.extractfile("demo/log.txt").read().decode()
        assert json.loads(tar.extractfile("demo/x_r1.json").read()) == {"tokens_per_s": 5}
    assert log.splitlines() == ["hello", "oops", "[demo] x: exit 0", '"tokens_per_s": 5', "-unset"]


def test_the_readme_names_every_part_and_its_examples_parse(tmp_path: Path) -> None:
    import shlex
    text = (ROOT / "benchmarks/README.md").read_text()
    assert all(f"| `{n}` |" in text for n in PARTS)
    block = text.split("## GPU sessions", 1)[1].split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    examples = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert len(examples) >= 3
    for words in examples:
        start = 2 if words[0] == "bash" else 3  # after `bash session.sh` / `python3 -m benchmarks.gpu.session`
        assert session.parse(["--out", str(tmp_path), *words[start:]]).parts


def test_every_gpu_script_is_reached_from_a_part(tmp_path: Path) -> None:
    """A script in benchmarks/gpu/ that no part runs, directly or through a script a part runs, is dead weight."""
    named: set[str] = set()
    for name in PARTS:
        [(_, plan, _)] = _plans([name, *MINIMAL.get(name, [])], tmp_path)
        for s in plan.steps:
            named |= {Path(w).name for w in s.argv if re.fullmatch(r"[\w./-]+\.(py|sh)", w)}
            named |= {w.split(".")[-1] + ".py" for i, w in enumerate(s.argv[1:]) if s.argv[i] == "-m"}
    gpu = ROOT / "benchmarks/gpu"
    reached, frontier = set(named), set(named)
    while frontier:  # scripts and modules those name in turn (imports, calls)
        text = " ".join((gpu / f).read_text() for f in frontier if (gpu / f).is_file())
        frontier = {p.name for p in gpu.glob("*.*") if p.suffix in (".py", ".sh") and p.name not in reached
                    and re.search(rf"\b{p.stem}\.(py|sh)\b|gpu\.{p.stem}\b|from \.?{p.stem} import|import {p.stem}\b", text)}
        reached |= frontier
    own = {"session.sh", "session.py", "session_parts.py", "session_steps.py", "split_big_carry.sh", "__init__.py"}
    dead = sorted(p.name for p in gpu.glob("*.*") if p.suffix in (".py", ".sh") and p.name not in reached | own)
    assert not dead, f"benchmarks/gpu scripts no session part reaches: {dead}"


def test_the_8b_runs_through_the_gate_parts_and_never_through_the_0_5bs_bench(tmp_path: Path) -> None:
    [(_, plan, _)] = _plans(["m5", "--engine", "exports/train_engine_8b", "--case", "minicpm4-8b-8l", "--no-bench",
                             "--speed-micro-batch-size", "2"], tmp_path)
    [argv] = [s.argv for s in plan.steps]
    assert argv[argv.index("--engine") + 1] == "exports/train_engine_8b"
    assert argv[argv.index("--case") + 1] == "minicpm4-8b-8l" and argv[argv.index("--speed-micro-batch-size") + 1] == "2"
    [(_, plan, _)] = _plans(["compare", "--model", "minicpm4-8b-8l", "--micro-batch-size", "2"], tmp_path)
    assert {k: plan.steps[0].env[k] for k in ("MODEL", "MBS")} == {"MODEL": "minicpm4-8b-8l", "MBS": "2"}


def test_the_8b_bench_models_are_the_anchors_shapes_and_one_tp2_ranks() -> None:
    """bench8b's TOMLs: the 8-layer 8B is the gates' preset minicpm4-8b-8l; the TP=2 rank holds half of every
    sharded dimension (query and KV heads at head dim 128, FFN, vocabulary) and about half the FLOPs."""
    from gates.model_config import load

    from benchmarks.gpu.session_parts import M8L, M8L_TP2

    repo = Path(__file__).resolve().parents[2]
    full, rank = load(repo / M8L), load(repo / M8L_TP2)
    assert full.model_dump() == load("minicpm4-8b-8l").model_dump()
    assert (rank.num_heads, rank.num_kv_heads, rank.head_dim, rank.ffn_hidden_size, rank.vocab_size) == (
        full.num_heads // 2, full.num_kv_heads // 2, full.head_dim or full.hidden_size // full.num_heads,
        full.ffn_hidden_size // 2, full.vocab_size // 2)
    assert (rank.hidden_size, rank.num_layers) == (full.hidden_size, full.num_layers)
    assert 0.49 < rank.flops_per_token(4096) / full.flops_per_token(4096) < 0.51


def test_an_ab_variant_runs_another_engine_version_from_its_source_folder(tmp_path: Path) -> None:
    """--engine-src: that variant's runs import the engine from DIR (e.g. the version before a refactor, unpacked
    from a `git archive`), the carried wheels still after it; the other variants keep this tree's engine."""
    [(_, plan, _)] = _plans(["ab", "--rounds", "2", "--variant", "now", "--variant", "before",
                             "--engine-src", "/tmp/old/src"], tmp_path)
    paths = [(s.argv[-1].rsplit("/", 1)[-1], s.env["PYTHONPATH"]) for s in plan.steps]
    now, before = f"{ROOT}/exports/train_engine_0.5B/src:/carried", "/tmp/old/src:/carried"
    assert paths == [("now_r1.json", now), ("before_r1.json", before), ("now_r2.json", now), ("before_r2.json", before)]
    with pytest.raises(SystemExit):
        _plans(["ab", "--engine-src", "/tmp/old/src", "--variant", "x"], tmp_path / "b")


def test_an_ab_variant_can_run_deterministic(tmp_path: Path) -> None:
    """--deterministic belongs to the variant before it: what `pretrain --deterministic` costs, beside the default."""
    [(_, plan, _)] = _plans(["ab", "--variant", "fast", "--variant", "det", "--deterministic"], tmp_path)
    runs = {s.argv[-1].rsplit("/", 1)[-1]: "--deterministic" in s.argv for s in plan.steps}
    assert runs == {"fast_r1.json": False, "det_r1.json": True}
    with pytest.raises(SystemExit):
        _plans(["ab", "--deterministic", "--variant", "x"], tmp_path / "b")


def test_a_part_given_again_writes_its_own_folder_and_bundle(tmp_path: Path) -> None:
    """m5 at two global batches in one call: m5/ and m5-2/ (each its own .tgz), each with its own options."""
    inv = session.parse(["--out", str(tmp_path), "m5", "--m5-parts", "mfu", "--", "m5", "--no-bench", "--m5-parts", "mfu",
                         "--speed-global-batch-size", "8"])
    (n1, plan1, c1), (n2, plan2, c2) = session.plans(inv)
    assert (n1, n2) == ("m5", "m5") and (c1.label("m5"), c2.label("m5")) == ("m5", "m5-2")
    assert c1.part_dir("m5") == tmp_path / "m5" and c2.part_dir("m5") == tmp_path / "m5-2"
    gate1, gate2 = (next(a for a in argv_lists(p) if "benchmarks.gpu.gate_stage" in a) for p in (plan1, plan2))
    assert gate1[gate1.index("--out") + 1] == str(tmp_path / "m5") and gate2[gate2.index("--out") + 1] == str(tmp_path / "m5-2")
    assert gate2[gate2.index("--speed-global-batch-size") + 1] == "8" and len(argv_lists(plan1)) == 2
