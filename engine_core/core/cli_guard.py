"""The engines' command-line error contract: `guard(fn)` turns an EngineError (or a model ConfigError) into one
line on stderr, 'error: ...' (from rank r of a multi-process run: 'error (rank r): ...') and exit 1;
Unsupported into 'unsupported: ...' and exit 77 (the probe contract); an OSError (a full disk, a permission)
into its one line and exit 1."""

from __future__ import annotations

import functools
import os

import typer
from rich.console import Console

from ..minicpm.config import ConfigError
from .errors import EXIT_ERROR, EXIT_UNSUPPORTED, EngineError, Unsupported

err = Console(stderr=True, highlight=False, soft_wrap=True)  # messages stay one line per line


def guard(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (EngineError, ConfigError) as e:
            world = int(os.environ.get("WORLD_SIZE", 1))
            who = f" (rank {os.environ.get('RANK', 0)})" if world > 1 else ""
            label = "unsupported" if isinstance(e, Unsupported) else "error"
            err.print(f"{label}{who}: {e}", markup=False)
            raise typer.Exit(EXIT_UNSUPPORTED if isinstance(e, Unsupported) else EXIT_ERROR) from None
        except OSError as e:
            err.print(f"error: {e}", markup=False)
            raise typer.Exit(EXIT_ERROR) from None

    return wrapper
