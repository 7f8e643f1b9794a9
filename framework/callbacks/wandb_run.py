"""Weights & Biases: on by default, offline without an API key, and one run per training job across resumes."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

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
    logger = BackgroundWandbLogger(project=options.project or os.environ.get("WANDB_PROJECT", "pretrain"),
                         entity=options.entity or os.environ.get("WANDB_ENTITY"), name=options.name,
                         tags=options.tags or None, save_dir=save_dir, id=run_id or new_run_id(),
                         resume="allow", offline=mode == "offline", log_model=False)
    # Lightning passes anonymous=None to wandb.init, and wandb >= 0.2x warns that the setting has no effect, before
    # its own silent setting applies; leaving the key out changes nothing else
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    logger.start()
    return logger


_STARTED: list["BackgroundWandbLogger"] = []  # loggers of this process whose run may still be starting


class BackgroundWandbLogger(WandbLogger):
    """A WandbLogger whose run starts in a background thread, so that training does not wait for it: `wandb.init`
    starts W&B's service process and blocks for seconds (3.7 s of a 1-step CPU fit measured in
    benchmarks/results/startup.md). Hyperparameters and metrics logged before the run is up are queued and sent, in
    order, once it is; anything that needs the run object itself (`experiment`) waits for the thread. The run id is
    chosen up front (make_logger), so checkpoints know it without waiting. Rank 0 only, as W&B logging is."""

    def start(self) -> None:
        if rank_zero_only.rank != 0 or getattr(self, "_thread", None) is not None:
            return
        self._pending: list[tuple[str, Any, int | None]] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._init_run, name="wandb-init", daemon=True)
        self._thread.start()
        _STARTED.append(self)

    def _init_run(self) -> None:
        try:
            WandbLogger.experiment.fget(self)  # the parent's property: wandb.init, once
        except BaseException as e:  # noqa: BLE001 - raised again in the main thread by wait()
            self._error = e

    def _starting(self) -> bool:
        thread = getattr(self, "_thread", None)
        return thread is not None and thread.is_alive()

    def wait(self) -> None:
        """Block until the run is up, then send what was queued meanwhile."""
        thread = getattr(self, "_thread", None)
        if thread is None:
            return
        thread.join()
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        pending, self._pending = self._pending, []
        for kind, value, step in pending:
            if kind == "hyperparams":
                WandbLogger.log_hyperparams(self, value)
            else:
                WandbLogger.log_metrics(self, value, step)

    @property
    def experiment(self) -> Any:
        self.wait()
        return WandbLogger.experiment.fget(self)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if self._starting():
            self._pending.append(("hyperparams", params, None))
            return
        self.wait()
        super().log_hyperparams(params)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._starting():
            self._pending.append(("metrics", dict(metrics), step))
            return
        self.wait()
        super().log_metrics(metrics, step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.wait()
        super().finalize(status)


def wait_for_runs() -> None:
    """Let every W&B run this process started finish starting and send its queue (before wandb.finish)."""
    while _STARTED:
        _STARTED.pop().wait()


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
