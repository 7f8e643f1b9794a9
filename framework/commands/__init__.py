"""The `pretrain` command: one module per subcommand in this package, each a thin argument parser over library calls.
Nothing outside this package imports it (tests/test_layout.py checks); `framework/__main__.py` and the `pretrain`
script enter through `main`.

    pretrain prepare ...   corpus -> tokenized webdataset shards (prepare.py)
    pretrain prepare-images ...  a folder per class (or the synthetic set) -> image shards
                           (prepare_images.py)
    pretrain prepare-molecules ...  SMILES, CSV or SD files (or an embedded set) -> graph shards (prepare_molecules.py)
    pretrain fit ...       train (fit.py)
    pretrain validate ...  validation loss of a checkpoint (fit.py)
    pretrain generate ...  sample from a GPT checkpoint (generate.py)
    pretrain fill-mask ... top-k guesses for each <|mask|> of a text, from a masked-LM checkpoint (fill_mask.py)
    pretrain zero-shot ... zero-shot classification and retrieval of a CLIP checkpoint on image shards
    pretrain export ...    any checkpoint -> safetensors + config.json + tokenizer.json (export.py)
    pretrain plan ...      what fits on N GPUs and how fast, per strategy (plan.py)
    pretrain distill-cache ...  a teacher's top-k outputs for every train window, for offline distillation
                           (distill_cache.py)
    pretrain transfer-report ...  pre-trained vs scratch fine-tuning over label fractions (transfer_report.py)
"""

from __future__ import annotations

import importlib
import os
import sys

from framework.errors import UserError, fail

# subcommand -> ("module:function" taking argv, one-line help); modules are imported only when their command runs
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("framework.commands.prepare:main", "tokenize a corpus into webdataset shards with a manifest"),
    "prepare-images": ("framework.commands.prepare_images:main",
                       "a folder per class (or --synthetic N) -> image shards with a manifest"),
    "prepare-molecules": ("framework.commands.prepare_molecules:main",
                          "SMILES / CSV / SDF (or --embedded nci) -> molecule graph shards with a manifest"),
    "fit": ("framework.commands.fit:fit", "train a model (LightningCLI: --config FILE.yaml, --model.* --data.* --trainer.*; "
                                      "--verbose shows third-party output)"),
    "validate": ("framework.commands.fit:validate", "compute the validation loss of a checkpoint (--ckpt_path)"),
    "generate": ("framework.commands.generate:main", "sample text from a GPT checkpoint or an exported GPT"),
    "fill-mask": ("framework.commands.fill_mask:main", "top-k guesses for each <|mask|> in a text, from a masked-LM encoder"),
    "zero-shot": ("framework.commands.zero_shot:main", "zero-shot accuracy (prompts per class) and retrieval recall of a CLIP"),
    "export": ("framework.commands.export:main", "checkpoint -> model.safetensors, config.json, tokenizer.json"),
    "plan": ("framework.commands.plan:main", "GPU memory and speed of every strategy for a config, and the one to use"),
    "distill-cache": ("framework.commands.distill_cache:main", "a teacher's top-k outputs for every train window "
                                                               "(offline distillation)"),
    "transfer-report": ("framework.commands.transfer_report:main", "fine-tune pre-trained vs scratch over label fractions: report.md, "
                                                   "report.json, transfer.png"),
}

USAGE = "usage: pretrain {" + ",".join(COMMANDS) + "} [options]   (pretrain COMMAND --help for details)"


def _help() -> str:
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # a fresh `pretrain` process, not a call from Python
        # W&B exports its service's address (WANDB_SERVICE, a Unix socket) to the children of a process that uses
        # it; inherited from whatever launched this job (a notebook, a test runner, passed on by sbatch), it would
        # make this run register with a service that is not its own: unreachable on another host, or one that
        # still holds the run of a killed attempt ("run ID ... is in use" on a requeue). Start our own.
        os.environ.pop("WANDB_SERVICE", None)
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
    module_name, function = COMMANDS[name][0].split(":")
    try:
        getattr(importlib.import_module(module_name), function)(rest)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
