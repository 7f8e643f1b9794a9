"""`pretrain fit` and `pretrain validate`: LightningCLI over a task and the shard datamodule, plus our run policy.

The typed signatures of the task (`--model.*`), the datamodule (`--data.*`: any framework.data.base.StreamDataModule,
by default the token windows' ShardDataModule), `Trainer` (`--trainer.*`),
`WandbOptions` (`--wandb.*`), `CheckpointOptions` (`--checkpoint.*`) and `RunSummary` (`--summary.*`) are the
config schema; `pretrain fit --print_config` shows every key with its resolved value.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import StrategyRegistry

from framework.callbacks.checkpointing import StepCheckpoint, find_checkpoint, peek
from framework.callbacks.guard import Guard, GuardOptions
from framework.callbacks.preemption import EXIT_REQUEUE, Preemption
from framework.callbacks.progress import progress_for
from framework.callbacks.summary import RunSummary
from framework.callbacks.throughput import Throughput
from framework.callbacks.wandb_run import RUN_ID_KEY, WandbOptions, WandbRunId, make_logger
from framework.data.base import StreamDataModule
from framework.distributed import STRATEGIES, make_strategy
from framework.errors import UserError
from framework.checkpoint.extras import run_metadata
from framework.tasks.base import PretrainTask

DEFAULT_TASK = "framework.tasks.causal_lm.CausalLMTask"
DEFAULT_DATA = "framework.data.datamodule.ShardDataModule"


@dataclass
class CheckpointOptions:
    """Checkpoints go to `{trainer.default_root_dir}/checkpoints`: every `every_n_steps` steps and at the end of
    training; the `keep` newest are kept and `last.ckpt` links to the newest."""

    every_n_steps: int = 1000
    keep: int = 3


@dataclass
class DistributedOptions:
    """How `--trainer.strategy NAME` is built (names: auto, ddp, fsdp, deepspeed_stage_1, deepspeed_stage_2,
    deepspeed_stage_2_offload, deepspeed_stage_3, deepspeed_stage_3_offload; see the README's strategy table).

    deepspeed_config: a DeepSpeed JSON file merged over the one generated from the run (its keys win).
    offload_params: keep parameters in CPU memory between uses (fsdp, deepspeed_stage_3_offload).
    expert_parallel: split the experts of MoE layers over groups of this many data-parallel ranks (strategy ddp).
    global_batch_size: samples per optimizer step over all ranks, kept whatever the world size: gradient
        accumulation is set to global_batch_size / (world size x data.batch_size) at every (re)start (it must
        divide; an elastic job checks every world size it may run at), replacing trainer.accumulate_grad_batches.
        Unset: trainer.accumulate_grad_batches, and the global batch changes with the world size.
    timeout: seconds a collective waits for the other ranks before failing (unset: torch's 1800). The ranks that
        survive a lost node notice it after this long (unless the node's connections close first), so an elastic
        job wants it short; it is also the time the ranks have to meet at start-up.
    """

    deepspeed_config: str | None = None
    offload_params: bool = False
    expert_parallel: int = 1
    global_batch_size: int | None = None
    timeout: float | None = None


class PretrainCLI(LightningCLI):
    restart_after: dict[str, Any] | None = None  # the loss-spike rollback this fit restarts after (see `run`)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(WandbOptions, "wandb")
        parser.add_class_arguments(CheckpointOptions, "checkpoint")
        parser.add_class_arguments(DistributedOptions, "distributed")
        parser.add_class_arguments(RunSummary, "summary")
        parser.add_class_arguments(GuardOptions, "guard")
        parser.set_defaults({"model": {"class_path": DEFAULT_TASK}, "data": {"class_path": DEFAULT_DATA},
                             "trainer.default_root_dir": "runs/pretrain",
                             "trainer.max_epochs": -1, "trainer.num_sanity_val_steps": 0})

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would replace the model section with the hyperparameters saved in a --ckpt_path file, class
        included. Here the config is the truth (a resume continues it; a checkpoint of another task or model family
        is refused in one line by the task's on_load_checkpoint), so nothing is taken from the checkpoint here."""

    def before_instantiate_classes(self) -> None:
        trainer = self._section(self.config).trainer
        if trainer.precision is None:  # bf16 on GPUs; on CPUs it is ~20x slower than fp32, so fp32 there
            trainer.precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
        launched = torchrun_layout()
        if launched is not None:  # what torchrun started this time (an elastic job's changes from restart to restart)
            trainer.devices, trainer.num_nodes = launched

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        from framework.compat import check

        check({"lightning"} | ({"deepspeed"} if "deepspeed" in sys.modules else set()))
        cfg = self._section(self.config_init)
        root = cfg.trainer.default_root_dir
        ckpt_dir = os.path.join(root, "checkpoints")
        ckpt = find_checkpoint(cfg.get("ckpt_path"), ckpt_dir)
        cfg["ckpt_path"] = ckpt
        logger = make_logger(cfg.wandb, root, peek(ckpt, RUN_ID_KEY) if ckpt else None)
        if self.restart_after is not None:  # the weights of the checkpoint before the spike, the data after it
            self.datamodule.skip_to = self.restart_after["data"]
        callbacks = [Throughput(), WandbRunId(), cfg.summary, Guard(cfg.guard, resume=self.restart_after)]
        if self.subcommand in ("fit", None):
            # SIGUSR1 (SLURM's warning before the time limit) or SIGTERM: stop after this step; StepCheckpoint saves it
            callbacks += [Preemption(), StepCheckpoint(ckpt_dir, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep,
                                                         resume=ckpt)]
        trainer_config = {**cfg.trainer, **kwargs, "logger": logger if logger is not None else False,
                          "strategy": self._strategy(cfg)}
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        user_bars = [c for c in [*(cfg.trainer.callbacks or []), *extra] if isinstance(c, ProgressBar)]
        if cfg.trainer.enable_progress_bar is not False and not user_bars:
            callbacks.append(progress_for(sys.stdout))  # a bar on a terminal, a line per N steps in a log file
        if not verbose() and cfg.trainer.enable_model_summary is None:
            trainer_config["enable_model_summary"] = False  # the progress display's first line describes the model
        trainer = self._instantiate_trainer(trainer_config, callbacks + extra)
        if cfg.distributed.global_batch_size is not None:
            self._keep_global_batch(trainer, cfg)
        if logger is not None:
            logger.log_hyperparams({"config": self._section(self.config).clone().as_dict(), **run_metadata()})
        return trainer


    def _keep_global_batch(self, trainer: Trainer, cfg: Any) -> None:
        """Gradient accumulation for distributed.global_batch_size on this world size (Lightning's world, known
        once the Trainer exists; read at every optimizer step, and by DeepSpeed when the strategy is set up)."""
        from lightning.pytorch.utilities import rank_zero_warn

        micro, local = self.datamodule.batch_size, trainer.world_size // max(1, trainer.num_nodes)
        for nodes in elastic_nodes() or []:  # fail at the first start, not when a node is lost hours later
            accumulation_for(cfg.distributed.global_batch_size, nodes * local, micro, nodes)
        steps = accumulation_for(cfg.distributed.global_batch_size, trainer.world_size, micro, trainer.num_nodes)
        configured = cfg.trainer.accumulate_grad_batches or 1
        if configured not in (1, steps):
            rank_zero_warn(f"trainer.accumulate_grad_batches={configured} is replaced by {steps}: "
                           f"distributed.global_batch_size={cfg.distributed.global_batch_size} on {trainer.world_size} "
                           f"rank(s) x data.batch_size {micro}")
        trainer.accumulate_grad_batches = steps
        deepspeed_config = getattr(trainer.strategy, "full_config", None)
        if deepspeed_config is not None:
            deepspeed_config["gradient_accumulation_steps"] = steps

    def _section(self, config: Any) -> Any:
        """The config of the running subcommand (the whole config when built with run=False, as tests do)."""
        return config[self.subcommand] if self.subcommand else config

    def _strategy(self, cfg: Any) -> Any:
        """Our strategies by name (they also run on CPU); other Lightning strategy names and objects pass through."""
        name = cfg.trainer.strategy
        if not isinstance(name, str) or (name not in STRATEGIES and name in StrategyRegistry):
            return name
        devices, nodes = cfg.trainer.devices, cfg.trainer.num_nodes or 1
        if name == "auto" and cfg.distributed.timeout is not None and isinstance(devices, int) and devices * nodes > 1:
            name = "ddp"  # what Lightning's auto picks for several processes, with the timeout set
        if cfg.distributed.expert_parallel != 1:
            self._check_expert_parallel(cfg)
        return make_strategy(name, precision=str(cfg.trainer.precision), accelerator=str(cfg.trainer.accelerator),
                             micro_batch_size=self.datamodule.batch_size,
                             accumulate_grad_batches=cfg.trainer.accumulate_grad_batches or 1,
                             gradient_clip_val=getattr(self.model, "grad_clip", None) or None,
                             deepspeed_config=cfg.distributed.deepspeed_config,
                             offload_params=cfg.distributed.offload_params,
                             expert_parallel=cfg.distributed.expert_parallel, timeout=cfg.distributed.timeout)

    def _check_expert_parallel(self, cfg: Any) -> None:
        """The expert-parallel layout's one-line errors before any rank starts (configure_model checks again)."""
        from framework.distributed.expert_parallel import check_expert_parallel

        size, devices = cfg.distributed.expert_parallel, cfg.trainer.devices
        devices = int(devices) if isinstance(devices, str) and devices.isdigit() else devices
        moe = None
        if hasattr(self.model, "model_class") and getattr(self.model, "preset", None):
            config = self.model.model_class.config_class.from_preset(self.model.preset, **self.model.overrides)
            moe = getattr(config, "moe", None)
        if isinstance(size, int) and size > 1:
            world = devices * (cfg.trainer.num_nodes or 1) if isinstance(devices, int) else size
            check_expert_parallel(size, world, moe.num_experts if moe is not None else None)


def torchrun_layout() -> tuple[int, int] | None:
    """(processes per node, nodes) of this torchrun (re)start, from the environment torchrun gives its processes;
    None when torchrun did not start this process."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        return int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["GROUP_WORLD_SIZE"])
    except (KeyError, ValueError):
        return None


ELASTIC_ENV = "PRETRAIN_ELASTIC_NNODES"  # MIN:MAX, set by launch/torchrun.sh for an elastic job


def elastic_nodes() -> range | None:
    """The node counts an elastic job may run at (launch/torchrun.sh's NNODES=MIN:MAX), else None."""
    low, _, high = os.environ.get(ELASTIC_ENV, "").partition(":")
    if not (low.isdigit() and high.isdigit()):
        return None
    return range(int(low), int(high) + 1)


def accumulation_for(global_batch: int, world: int, micro: int, nodes: int = 1) -> int:
    """Micro-batches per optimizer step that keep `global_batch` samples per step on `world` ranks of `micro`;
    a UserError when that is not a whole number."""
    if global_batch < 1:
        raise UserError(f"distributed.global_batch_size must be >= 1, got {global_batch}")
    per_pass = world * micro
    if global_batch % per_pass:
        where = f"{world} rank(s)" + (f" ({nodes} node(s))" if nodes > 1 else "")
        raise UserError(f"distributed.global_batch_size={global_batch} is not a multiple of {where} x data.batch_size "
                        f"{micro} = {per_pass}: set it to a multiple of {per_pass} (of every world size x batch size "
                        "the job may run at), or change data.batch_size")
    return global_batch // per_pass


VERBOSE_ENV = "PRETRAIN_VERBOSE"


def verbose() -> bool:
    """Show third-party output (Lightning's info lines and model summary, library warnings, W&B's own lines):
    `pretrain --verbose ...` or PRETRAIN_VERBOSE=1."""
    return os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false", "no")


class _DropLightningChatter(logging.Filter):
    """Lightning's info lines that tell a user nothing about their run. The rest stays: our own messages go through
    the same logger (the preemption notice), and so do "Restored all states from the checkpoint" and the
    distributed set-up lines."""

    PREFIXES = ("GPU available", "TPU available", "HPU available", "\N{ELECTRIC LIGHT BULB} Tip", "Seed set to",
                "LOCAL_RANK: ", "`Trainer.fit` stopped")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


def quiet_third_party() -> None:
    """Silence what other libraries print that a user can do nothing about; real warnings still show."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningChatter) for f in logger.filters):
            logger.addFilter(_DropLightningChatter())
    # Lightning's own use of torch's deprecated pytree API
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # a hint for SLURM users, printed on every machine that has srun even when the run is not a SLURM job
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")
    # on every multi-process validation; the task reduces its val metrics over the ranks itself (on_validation_epoch_end)
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\(.*sync_dist=True\)")
    # DeepSpeed's ZeRO-3 calls torch's deprecated collectives on every step
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\._\w+_base` is a private function",
                            category=FutureWarning)
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banner, deprecation notes and history block at finish


def run(subcommand: str, argv: list[str]) -> None:
    # we hand LightningCLI the arguments after the subcommand ourselves; its warning about sys.argv is noise here
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    if not verbose():
        quiet_third_party()
    rollback = None
    while True:
        cli = _run_cli(subcommand, argv, rollback)
        rollback = next((c.rollback for c in cli.trainer.callbacks if isinstance(c, Guard)), None)
        if rollback is None:
            break
        # a loss spike (framework/callbacks/guard.py): every rank restarts the fit from the checkpoint before it, in this
        # process; the process group stays up, and Lightning must not launch the other ranks a second time
        argv = [*argv, "--ckpt_path", rollback["event"]["checkpoint"]]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            os.environ.setdefault("LOCAL_RANK", "0")
    preempted = [c for c in cli.trainer.callbacks if isinstance(c, Preemption) and c.signal_received == "SIGTERM"]
    if preempted:
        print(f"stopped on SIGTERM after step {preempted[0].stopped_at}, which is checkpointed: exiting with "
              f"{EXIT_REQUEUE} (requeue, then resume with --ckpt_path last)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_REQUEUE)


def _run_cli(subcommand: str, argv: list[str], rollback: dict[str, Any] | None) -> PretrainCLI:
    PretrainCLI.restart_after = rollback
    try:
        return PretrainCLI(PretrainTask, StreamDataModule, subclass_mode_model=True, subclass_mode_data=True,
                           args=[subcommand, *argv], save_config_kwargs={"overwrite": True},
                           load_from_checkpoint_support=False, auto_configure_optimizers=False,
                           parser_kwargs={"exit_on_error": False, "allow_abbrev": False})
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - jsonargparse reports bad configs as ArgumentError / ValueError
        inner = _in_chain(e, UserError)  # e.g. a bad preset raised while jsonargparse instantiated the task
        if inner is not None:
            raise inner from None
        if type(e).__name__ in ("ArgumentError", "NSKeyError") or "jsonargparse" in type(e).__module__:
            raise UserError(config_error(str(e), _chosen_classes(argv))) from None
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        misconfigured = _in_chain(e, MisconfigurationException)  # Lightning's check of the trainer, e.g. devices=0
        if misconfigured is not None:
            flat = " ".join(str(misconfigured).split()).rstrip(".")
            raise UserError(f"the trainer settings are invalid: {flat}; fix the --trainer.* value it names") from None
        raise
    finally:
        PretrainCLI.restart_after = None
        _finish_wandb()


def _finish_wandb() -> None:
    """Close the W&B run of this process, so that a later fit in the same process starts (or resumes) its own."""
    from framework.callbacks.wandb_run import wait_for_runs

    wandb = sys.modules.get("wandb")
    try:
        wait_for_runs()
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()
    except Exception as e:  # noqa: BLE001 - e.g. W&B's service process got the job's SIGTERM too and is gone
        print(f"warning: could not close the W&B run cleanly ({type(e).__name__}: {e}); what it received is in "
              "its run folder (offline) or on the server, and a resume continues it", file=sys.stderr, flush=True)
        if wandb is not None:
            try:
                wandb.teardown()  # forget the broken run, so a later fit in this process can start its own
            except Exception:  # noqa: BLE001
                pass


def _in_chain(e: BaseException | None, kind: type[BaseException], depth: int = 0) -> BaseException | None:
    """The first exception of `kind` in an exception's cause/context chain, if any."""
    if e is None or depth > 20:
        return None
    if isinstance(e, kind):
        return e
    return _in_chain(e.__cause__, kind, depth + 1) or _in_chain(e.__context__, kind, depth + 1)


def _chosen_classes(argv: list[str]) -> list[type]:
    """The task and datamodule classes a command line chooses (its --config files and --model/--data class paths,
    else the defaults): unknown-key suggestions come from their signatures."""
    import importlib
    import json

    import yaml

    paths = {"model": DEFAULT_TASK, "data": DEFAULT_DATA}
    for i, arg in enumerate(argv[:-1]):
        value = argv[i + 1]
        if arg == "--config":
            try:
                with open(value) as f:
                    cfg = (json.load(f) if value.endswith(".json") else yaml.safe_load(f)) or {}
            except (OSError, ValueError, yaml.YAMLError):
                continue
            for section in paths:
                if isinstance(cfg.get(section), dict) and "class_path" in cfg[section]:
                    paths[section] = cfg[section]["class_path"]
        for section in paths:
            if arg in (f"--{section}", f"--{section}.class_path") and not value.startswith("{"):
                paths[section] = value
    classes = []
    for path in paths.values():
        module, _, name = path.rpartition(".")
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError, ValueError):
            pass
    return classes


def _init_params(cls: type) -> list[str]:
    """Every named __init__ parameter of a class and its bases (what **kwargs forwards to)."""
    import inspect

    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names += [p.name for p in inspect.signature(klass.__init__).parameters.values()
                      if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names


def config_error(message: str, classes: list[type] | None = None) -> str:
    """jsonargparse's (multi-line) complaint about a config -> one line, with a "did you mean" for unknown keys drawn
    from the chosen task's and datamodule's signatures (`classes`), the trainer's and our sections'."""
    flat = " ".join(line.strip() for line in message.splitlines() if line.strip())
    unknown = re.search(r"[Kk]ey[s]? \"?'?([\w.\-]+)\"?'? (?:is|are) not expected", flat) or \
        re.search(r"[Uu]nrecognized arguments: (\S+)", flat)
    option = re.search(r"Parser key \"(\w+)\".*Option '([\w.]+)' is not accepted", flat)
    if unknown or option:
        key = f"{option.group(1)}.{option.group(2)}" if option else unknown.group(1).lstrip("-")
        leaf = key.split(".")[-1]
        known = [name for cls in (classes or []) for name in _init_params(cls)]
        known += [*_init_params(Trainer), *CheckpointOptions.__dataclass_fields__, *WandbOptions.__dataclass_fields__,
                  *DistributedOptions.__dataclass_fields__]
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown config key '{key}'{hint}; `pretrain fit --print_config` lists every key"
    return f"bad config: {flat[:400]}"


def fit(argv: list[str]) -> None:
    if "--verbose" in argv:  # ours: LightningCLI's fit has no such option (its validate has one, for another thing)
        argv = [a for a in argv if a != "--verbose"]
        os.environ[VERBOSE_ENV] = "1"
    run("fit", argv)


def validate(argv: list[str]) -> None:
    run("validate", argv)
