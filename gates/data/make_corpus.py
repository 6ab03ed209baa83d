"""How `default_corpus.jsonl.gz` was made (run once, output committed; not run at training time).

Text every CPython install has: the `pydoc_data.topics` help pages and the docstrings of standard
library modules, classes and functions. Python-version dependent, which is why the result is
shipped rather than rebuilt: every machine trains on the same bytes.

    python -m gates.data.make_corpus gates/data/default_corpus.jsonl.gz
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import pkgutil
import sys
import warnings

SKIP = ("test", "idlelib", "tkinter", "turtle", "lib2to3", "ensurepip", "antigravity", "this", "__")


def documents() -> list[dict]:
    import pydoc_data.topics as topics

    docs = [{"source": f"pydoc:{k}", "text": v.strip()} for k, v in sorted(topics.topics.items())]
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names)
    for name in names:
        if name.startswith(SKIP):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        parts = [inspect.getdoc(mod) or ""]
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 80:
                    parts.append(f"{name}.{attr}\n{doc}")
        text = "\n\n".join(p for p in parts if p).strip()
        if len(text) > 200:
            docs.append({"source": f"stdlib:{name}", "text": text})
    return docs


if __name__ == "__main__":
    out = sys.argv[1]
    docs = documents()
    with gzip.GzipFile(out, "wb", mtime=0) as f:
        for d in docs:
            f.write((json.dumps(d, ensure_ascii=False) + "\n").encode())
    print(f"{len(docs)} documents, {sum(len(d['text']) for d in docs):,} characters -> {out}")
