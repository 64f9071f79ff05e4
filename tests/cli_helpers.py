"""Helpers shared by the tests of the `rlhf` command (tests/test_cli.py, tests/test_commands.py)."""

from __future__ import annotations


def one_line_error(stderr: str) -> str:
    """The one line of `stderr`, which must be an `error: ...` line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got {stderr!r}"
    return lines[0]
