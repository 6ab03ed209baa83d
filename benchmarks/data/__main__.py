"""python -m benchmarks.data tokenize|scale [--out DIR]: run a data benchmark on this CPU, write DIR/<name>.json.

    python -m benchmarks.data tokenize --megabytes 20 --repeats 3 --out benchmarks/results/data/<date>-cpu-data-pipeline
    python -m benchmarks.data scale --sizes-gb 0.1 5 --out benchmarks/results/data/<date>-cpu-data-pipeline

Scratch data goes to a folder under --work (default /tmp), deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.data import env


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize", help="prepare-data vs datasets.map tokens/s, 1 process and every core")
    t.add_argument("--megabytes", type=int, default=40)
    t.add_argument("--docs-per-shard", type=int, default=500)
    t.add_argument("--repeats", type=int, default=3, help="each configuration this many times, interleaved; medians")
    s = sub.add_parser("scale", help="start-up time, peak RSS and loader tokens/s on growing prepared corpora")
    s.add_argument("--sizes-gb", type=float, nargs="+", default=[0.1, 5.0])
    s.add_argument("--loader-seconds", type=float, default=5.0)
    s.add_argument("--on-the-fly-mb", type=int, default=0, help="also: pretrain --hf-dataset on a text corpus this big")
    s.add_argument("--prefetch-ab", action="store_true", help="instead: cold loader reads with and without madvise(WILLNEED)")
    for q in (t, s):
        q.add_argument("--out", type=Path, help="write <out>/<name>.json (default: print only)")
        q.add_argument("--name", help="the JSON's name in --out (default: the command's)")
        q.add_argument("--work", type=Path, default=Path("/tmp"), help="where the scratch data goes (deleted after)")
    c = sub.add_parser("_startup-child")
    c.add_argument("path", type=Path)
    c.add_argument("--text", action="store_true")
    lc = sub.add_parser("_loader-child")
    lc.add_argument("path", type=Path)
    lc.add_argument("--vocab", type=int, required=True)
    lc.add_argument("--seconds", type=float, required=True)
    lc.add_argument("--cold", action="store_true")
    lc.add_argument("--no-prefetch", action="store_true")
    a = p.parse_args(argv)

    if a.cmd == "_startup-child":
        from benchmarks.data.scale import startup_child

        print(json.dumps(startup_child(a.path, a.text)))
        return
    if a.cmd == "_loader-child":
        from benchmarks.data.scale import loader_child

        print(json.dumps(loader_child(a.path, a.vocab, a.seconds, a.cold, not a.no_prefetch)))
        return
    record = env.record(argv)
    work = Path(tempfile.mkdtemp(prefix="forge-data-bench-", dir=a.work))
    try:
        if a.cmd == "tokenize":
            from benchmarks.data import tokenize

            record["result"] = tokenize.run(work, a.megabytes, a.docs_per_shard, a.repeats)
        else:
            from benchmarks.data import scale

            record["result"] = scale.run(work, a.sizes_gb, a.loader_seconds, a.on_the_fly_mb, a.prefetch_ab)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record["load_avg_end"] = env.load()
    text = json.dumps(record, indent=1)
    print(text)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{a.name or a.cmd}.json").write_text(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
