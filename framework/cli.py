"""The `pretrain` command: one subcommand per job.

    pretrain prepare ...   corpus -> tokenized webdataset shards (framework.data.prepare)
"""

from __future__ import annotations

import importlib
import sys

from framework.errors import UserError, fail

# subcommand -> (module with a `main(argv)` function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("framework.data.prepare", "tokenize a corpus into webdataset shards with a manifest"),
}

USAGE = "usage: pretrain {" + ",".join(COMMANDS) + "} [options]   (pretrain COMMAND --help for details)"


def _help() -> str:
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        fail(f"unknown command '{name}'{hint}; commands: {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    try:
        module.main(rest)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
