"""Weights & Biases: on by default, offline without an API key, and one run per training job across resumes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
from lightning.pytorch.loggers import WandbLogger

RUN_ID_KEY = "wandb_run_id"


@dataclass
class WandbOptions:
    """W&B settings (`--wandb.*`). Environment variables WANDB_PROJECT, WANDB_ENTITY and WANDB_MODE are honoured.

    mode: auto = WANDB_MODE if set, else online when WANDB_API_KEY is set, else offline (never prompts for a login);
        disabled turns W&B off.
    """

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str | None = None
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def make_logger(options: WandbOptions, save_dir: str, run_id: str | None) -> WandbLogger | None:
    """A WandbLogger that continues `run_id` when resuming, or None when W&B is disabled."""
    mode = resolve_mode(options.mode)
    if mode == "disabled":
        return None
    os.makedirs(save_dir, exist_ok=True)
    logger = WandbLogger(project=options.project or os.environ.get("WANDB_PROJECT", "pretrain"),
                         entity=options.entity or os.environ.get("WANDB_ENTITY"), name=options.name,
                         tags=options.tags or None, save_dir=save_dir, id=run_id or new_run_id(),
                         resume="allow", offline=mode == "offline", log_model=False)
    # Lightning passes anonymous=None to wandb.init, and wandb >= 0.2x warns that the setting has no effect, before
    # its own silent setting applies; leaving the key out changes nothing else
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


def new_run_id() -> str:
    """A fresh W&B-style run id: 8 characters of [a-z0-9]."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbRunId(L.Callback):
    """Stores the W&B run id in every checkpoint, so `--ckpt_path` resumes into the same run."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                checkpoint[RUN_ID_KEY] = logger.version


def offline_dir(logger: WandbLogger) -> str | None:
    """The local folder of the run (what `wandb sync` uploads)."""
    run = logger.experiment
    files_dir = getattr(run, "dir", None)
    return os.path.dirname(files_dir) if files_dir else None


def run_location(logger: WandbLogger) -> str:
    """One line: the run id and where to see it (its URL online, its local folder offline)."""
    if getattr(logger, "_offline", False):
        return f"W&B (offline) run {logger.version}: {offline_dir(logger)}"
    return f"W&B run {logger.version}: {logger.experiment.url}"
