"""User-facing errors: one line that names the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import sys


class UserError(Exception):
    """Bad input from the user (a path, a config value, a data file). The message is shown as is, on one line."""

    exit_code = 2


def fail(message: str) -> "None":
    """Print `error: message` to stderr and exit with code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(UserError.exit_code)
