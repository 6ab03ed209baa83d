"""A number in a spec's comment on a `policy = ...` line is one the policy applies (gates/policies.py's own
`describe()` of that gate's resolved policy), so a comment cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gates.policies import resolve_policy

SPECS = sorted((Path(__file__).resolve().parents[2] / "specs").glob("*.toml"))
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?(?![\w.])")  # bare numbers, not the 16 of bf16
ASSIGN = re.compile(r'^\s*(\w+)\s*=\s*"([^"]*)"\s*(?:#(.*))?$')


def policy_comments(text: str, default_dtype: str) -> list[tuple[int, str, str, str]]:
    """(line, policy, dtype, comment) for every commented `policy = ...` line of a spec's gates."""
    found, gate, start = [], {}, 0

    def close() -> None:
        if "comment" in gate:
            found.append((start, gate["policy"], gate.get("dtype", default_dtype), gate["comment"]))

    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("["):
            close()
            gate, start = {}, n
            continue
        m = ASSIGN.match(line)
        if m and m.group(1) in ("dtype", "policy"):
            gate[m.group(1)] = m.group(2)
            if m.group(1) == "policy" and m.group(3):
                gate["comment"] = m.group(3)
    close()
    return found


def numbers(text: str) -> set[float]:
    return {float(x) for x in NUMBER.findall(text)}


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_policy_comments_state_only_numbers_the_policy_applies(spec: Path) -> None:
    text = spec.read_text()
    default = "float32" if 'device = "cpu"' in text else "bfloat16"
    for line, policy, dtype, comment in policy_comments(text, default):
        applied = numbers(resolve_policy(policy, dtype).describe())
        stray = numbers(comment) - applied
        assert not stray, f"{spec.name} gate at line {line}: comment states {sorted(stray)}, the policy applies {sorted(applied)}"


def test_a_stale_bound_in_a_comment_is_caught() -> None:
    stale = '[[stages.gates]]\ndtype = "bfloat16"\npolicy = "dtype"  # rel 3e-2, max_rel 1e-1\n'
    ((_, policy, dtype, comment),) = policy_comments(stale, "bfloat16")
    assert numbers(comment) - numbers(resolve_policy(policy, dtype).describe()) == {3e-2, 1e-1}
