"""The `pretrain` command: one subcommand per job.

    pretrain prepare ...   corpus -> tokenized webdataset shards (framework.data.prepare)
    pretrain prepare-images ...  a folder per class (or the synthetic set) -> image shards
                           (framework.data.prepare_images)
    pretrain fit ...       train (framework.train)
    pretrain validate ...  validation loss of a checkpoint (framework.train)
    pretrain generate ...  sample from a GPT checkpoint (framework.generate)
    pretrain fill-mask ... top-k guesses for each <|mask|> of a text, from a masked-LM checkpoint (framework.fill_mask)
    pretrain zero-shot ... zero-shot classification and retrieval of a CLIP checkpoint on image shards
    pretrain export ...    any checkpoint -> safetensors + config.json + tokenizer.json (framework.checkpoint.export)
    pretrain plan ...      what fits on N GPUs and how fast, per strategy (framework.plan)
    pretrain transfer-report ...  pre-trained vs scratch fine-tuning over label fractions (framework.transfer)
"""

from __future__ import annotations

import importlib
import sys

from framework.errors import UserError, fail

# subcommand -> ("module:function" taking argv, one-line help); modules are imported only when their command runs
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("framework.data.prepare:main", "tokenize a corpus into webdataset shards with a manifest"),
    "prepare-images": ("framework.data.prepare_images:main",
                       "a folder per class (or --synthetic N) -> image shards with a manifest"),
    "fit": ("framework.train:fit", "train a model (LightningCLI: --config FILE.yaml, --model.* --data.* --trainer.*; "
                                      "--verbose shows third-party output)"),
    "validate": ("framework.train:validate", "compute the validation loss of a checkpoint (--ckpt_path)"),
    "generate": ("framework.generate:main", "sample text from a GPT checkpoint or an exported GPT"),
    "fill-mask": ("framework.fill_mask:main", "top-k guesses for each <|mask|> in a text, from a masked-LM encoder"),
    "zero-shot": ("framework.zero_shot:main", "zero-shot accuracy (prompts per class) and retrieval recall of a CLIP"),
    "export": ("framework.checkpoint.export:main", "checkpoint -> model.safetensors, config.json, tokenizer.json"),
    "plan": ("framework.plan:main", "GPU memory and speed of every strategy for a config, and the one to use"),
    "transfer-report": ("framework.transfer:main", "fine-tune pre-trained vs scratch over label fractions: report.md, "
                                                   "report.json, transfer.png"),
}

USAGE = "usage: pretrain {" + ",".join(COMMANDS) + "} [options]   (pretrain COMMAND --help for details)"


def _help() -> str:
    lines = [USAGE, "", "commands:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
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
    module_name, function = COMMANDS[name][0].split(":")
    try:
        getattr(importlib.import_module(module_name), function)(rest)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
