"""What several commands' argument parsers share."""

from __future__ import annotations

import argparse

from framework.errors import UserError


class ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one `error:` line and exit 2 via the CLI, not argparse's usage dump
        raise UserError(f"{message}; see `{self.prog} --help`")


def add_model_arguments(p: argparse.ArgumentParser, of: str) -> None:
    """--ckpt, --model, --tokenizer and --trust-checkpoint: where a command's model (`of` what kind) comes from,
    as framework.checkpoint.load.load_model takes them."""
    p.add_argument("--ckpt", help=f"a checkpoint of `pretrain fit` of {of}, any strategy "
                   "(e.g. runs/NAME/checkpoints/last.ckpt)")
    p.add_argument("--model", help="a directory written by `pretrain export` from such a checkpoint")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of the one the checkpoint carries")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint fully (only for files from a trusted source; default: weights-only)")
