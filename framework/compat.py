"""The third-party internals this framework relies on, and a check that fails loudly, naming the version, when an
upgrade removed one (instead of a confusing AttributeError deep inside a run).

Each entry is (package, "module:Qualified.name", why). `check()` runs at `pretrain fit` start-up for the packages
that are imported; `tests/test_compat.py` runs it for all of them against the pinned versions (launch/constraints.txt).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

from framework.errors import UserError

INTERNALS: list[tuple[str, str, str]] = [
    ("lightning", "lightning.pytorch.cli:LightningCLI._parse_ckpt_path",
     "overridden so that a checkpoint's hyperparameters never replace the config (framework/commands/fit.py)"),
    ("lightning", "lightning.pytorch.cli:LightningCLI._get", "the callbacks given in the config (train.py)"),
    ("lightning", "lightning.pytorch.cli:LightningCLI._parser", "the callbacks given in the config (train.py)"),
    ("lightning", "lightning.pytorch.cli:LightningCLI._instantiate_trainer", "our callbacks added (train.py)"),
    ("lightning", "lightning.pytorch.callbacks:ModelCheckpoint._save_last_checkpoint",
     "the step-keyed checkpoints and last.ckpt (callbacks/checkpointing.py)"),
    ("deepspeed", "deepspeed.runtime.engine:DeepSpeedEngine.load_universal_checkpoint",
     "its config flag (engine._config.load_universal_checkpoint) is switched on to resume a ZeRO checkpoint on "
     "another world size (checkpoint/reshard.py)"),
    ("deepspeed", "deepspeed.checkpoint.ds_to_universal:main", "the universal-checkpoint conversion (reshard.py)"),
]


def missing(packages: set[str] | None = None) -> list[str]:
    """One line per internal that is absent from the installed version of its package (packages not installed are
    skipped: their features are simply unavailable)."""
    problems = []
    for package, target, why in INTERNALS:
        if packages is not None and package not in packages:
            continue
        try:
            installed = version(package)
        except PackageNotFoundError:
            continue
        module_name, qualname = target.split(":")
        try:
            obj = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            problems.append(f"{package} {installed} has no {target} ({why})")
    return problems


def check(packages: set[str]) -> None:
    """Fail with one line naming the package, its version and the fix when an internal we rely on is gone."""
    problems = missing(packages)
    if problems:
        raise UserError(f"{problems[0]}; install the versions this framework is tested with: pip install -c "
                        "launch/constraints.txt -e .")
