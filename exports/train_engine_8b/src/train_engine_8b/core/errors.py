"""The engine's one user-facing error type and its exit codes."""

EXIT_ERROR = 1  # bad input or a failed run: the message names the problem
EXIT_UNSUPPORTED = 77  # probe contract: a probe (or case) this engine cannot answer


class EngineError(Exception):
    """A problem the user can fix (bad option, dataset, tokenizer, checkpoint); the message names it."""


class Unsupported(EngineError):
    """Something this engine does not do (probe contract: exit 77, never a silent pass)."""
