"""The environment an agent's processes get: only what the spec allows, never a key or a token."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from harness.secrets import SECRET_NAME


def agent_env(allow: Sequence[str], extra: Mapping[str, str] | None = None,
              source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The names in `allow` copied from `source` (default os.environ) plus `extra`; any name that
    looks like a secret is dropped even if a spec allowed it."""
    source = os.environ if source is None else source
    env = {k: source[k] for k in allow if k in source and not SECRET_NAME.search(k)}
    env.update({k: v for k, v in (extra or {}).items() if not SECRET_NAME.search(k)})
    env.setdefault("PATH", os.defpath)
    return env
