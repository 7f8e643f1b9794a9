"""Every shipped config parses, names a real preset and strategy, and builds its model (on the meta device)."""

from pathlib import Path

import pytest
import torch

from framework.data.datamodule import MaskedLMDataModule, ShardDataModule
from framework.data.documents import ClassificationDataModule
from framework.models import FAMILIES
from framework.tasks.base import PretrainTask
from framework.tasks.classification import ClassificationTask
from framework.train import PretrainCLI

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


def test_there_are_configs():
    names = {str(p.relative_to(p.parents[1])) for p in CONFIGS}
    assert names >= {"gpt/smoke.yaml", "gpt/124m.yaml", "gpt/350m.yaml", "gpt/774m.yaml", "gpt/1.5b.yaml",
                     "bert/smoke.yaml", "bert/base.yaml", "bert/large.yaml", "finetune/smoke.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_config_parses_and_builds(path, tmp_path):
    # GPU recipes are parsed as they are, except that the Trainer is built for this CPU-only machine
    # a fine-tuning recipe takes its backbone from --model.init_from: here a preset of the same family stands in
    backbone = ["--model.init_args.backbone_preset", "bert-cpu"] if path.parent.name == "finetune" else []
    cli = PretrainCLI(PretrainTask, ShardDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                      args=["--config", str(path), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                            "--trainer.default_root_dir", str(tmp_path), "--wandb.mode", "disabled", *backbone],
                      save_config_callback=None, load_from_checkpoint_support=False, auto_configure_optimizers=False)
    task, data = cli.model, cli.datamodule
    if isinstance(task, ClassificationTask):
        assert isinstance(data, ClassificationDataModule)
        config = FAMILIES[task.backbone].config_class.from_preset(task.preset, **task.overrides)
        assert data.seq_len <= config.seq_len and cli.trainer.max_steps > task.warmup_steps
        return
    assert isinstance(data, ShardDataModule) and data.seq_len >= 1 and data.batch_size >= 1
    config = task.model_class.config_class.from_preset(task.preset, **task.overrides)
    assert data.seq_len <= config.seq_len, "data.seq_len must fit the model's context"
    with torch.device("meta"):
        model = task.model_class(config)
    assert model.num_params() > 0
    # masked LM is paired with the masking datamodule, and only it
    assert isinstance(data, MaskedLMDataModule) == (config.model_type == "bert")
    assert cli.trainer.max_steps > task.warmup_steps
