"""User-facing errors: one line that names the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import sys


class UserError(Exception):
    """Bad input from the user (a path, a config value, a data file). The message is shown as is, on one line."""

    exit_code = 2


def fail(message: str) -> "None":
    """Print `error: message` to stderr and exit with code 2.

    In a distributed run the process group is closed first: left to the interpreter's exit, gloo's threads can abort
    the process (SIGABRT, "terminate called without an active exception") once a peer on another node has gone, and
    the launcher then reports a crash with a traceback instead of this exit code."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; the message above is what the user needs
            pass
    raise SystemExit(UserError.exit_code)
