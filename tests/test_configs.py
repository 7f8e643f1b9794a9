"""Every shipped config parses, names a real preset and strategy, and builds its model (on the meta device)."""

from pathlib import Path

import pytest
import torch

from framework.data.datamodule import ShardDataModule
from framework.models.gpt import GPT, GPTConfig
from framework.tasks.base import PretrainTask
from framework.train import PretrainCLI

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"smoke.yaml", "124m.yaml", "350m.yaml", "774m.yaml", "1.5b.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_config_parses_and_builds(path, tmp_path):
    # GPU recipes are parsed as they are, except that the Trainer is built for this CPU-only machine
    cli = PretrainCLI(PretrainTask, ShardDataModule, subclass_mode_model=True, run=False,
                      args=["--config", str(path), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                            "--trainer.default_root_dir", str(tmp_path), "--wandb.mode", "disabled"],
                      save_config_callback=None, load_from_checkpoint_support=False, auto_configure_optimizers=False)
    task, data = cli.model, cli.datamodule
    assert isinstance(data, ShardDataModule) and data.seq_len >= 1 and data.batch_size >= 1
    config = GPTConfig.from_preset(task.preset, **task.overrides)
    assert data.seq_len <= config.seq_len, "data.seq_len must fit the model's context"
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params() > 0
    assert cli.trainer.max_steps > task.warmup_steps
