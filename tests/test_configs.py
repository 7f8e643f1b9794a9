"""Every shipped config parses, names a real preset and strategy, and builds its model (on the meta device)."""

from pathlib import Path

import pytest
import torch

from framework.data.base import StreamDataModule
from framework.data.datamodule import MaskedLMDataModule, ShardDataModule
from framework.data.documents import ClassificationDataModule
from framework.data.graphs import GraphDataModule
from framework.data.images import ImageDataModule
from framework.models.registry import family
from framework.tasks.base import PretrainTask
from framework.tasks.classification import ClassificationTask
from framework.tasks.clip import CLIPTask
from framework.tasks.graph import AttributeMaskingTask, ContrastiveTask, GraphTask
from framework.tasks.vision import ImageClassificationTask
from framework.commands.fit import PretrainCLI

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


def test_there_are_configs():
    names = {str(p.relative_to(p.parents[1])) for p in CONFIGS}
    assert names >= {"gpt/smoke.yaml", "gpt/124m.yaml", "gpt/350m.yaml", "gpt/774m.yaml", "gpt/1.5b.yaml",
                     "bert/smoke.yaml", "bert/base.yaml", "bert/large.yaml", "finetune/smoke.yaml",
                     "vision/smoke.yaml", "vision/resnet50.yaml", "vision/linear-probe.yaml", "clip/smoke.yaml",
                     "clip/vit-b-16.yaml", "graph/contrastive.yaml", "distill/smoke.yaml", "distill/bert.yaml", "distill/vision.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_config_parses_and_builds(path, tmp_path):
    # GPU recipes are parsed as they are, except that the Trainer is built for this CPU-only machine
    # a fine-tuning recipe takes its backbone from --model.init_from: here a preset of the same family stands in
    backbone = {"finetune": ["--model.init_args.backbone_preset", "bert-cpu"],
                "vision": ["--model.init_args.mode", "full"] if path.name == "linear-probe.yaml" else []}
    backbone = backbone.get(path.parent.name, [])
    cli = PretrainCLI(PretrainTask, StreamDataModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                      args=["--config", str(path), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                            "--trainer.default_root_dir", str(tmp_path), "--wandb.mode", "disabled", *backbone],
                      save_config_callback=None, load_from_checkpoint_support=False, auto_configure_optimizers=False)
    task, data = cli.model, cli.datamodule
    if isinstance(task, (ImageClassificationTask, CLIPTask)):  # images: the model is sized by the data's classes
        assert isinstance(data, ImageDataModule) and data.batch_size >= 1 and data.image_size >= 8
        if isinstance(task, CLIPTask):
            assert data.captions and not data.hflip, "captions name positions: a mirrored image contradicts them"
            config = task.model_class.config_class.from_preset(task.preset, **task.overrides)
            assert data.max_caption_tokens + 2 <= config.text["seq_len"]
        else:
            config = task.model_class.config_class.from_preset(task.preset, **task.overrides)
        if config.model_type == "clip" or config.model_type == "vit":
            image = config.image if config.model_type == "clip" else config.to_dict()
            assert image.get("image_size", data.image_size) == data.image_size or image["model_type"] == "resnet"
        with torch.device("meta"):
            assert task.model_class(config).num_params() > 0
        assert cli.trainer.max_steps > task.warmup_steps
        return
    if isinstance(task, GraphTask):  # molecule graphs: the feature vocabularies come from the data's manifest
        assert isinstance(data, GraphDataModule) and data.batch_size >= 1
        assert (data.mask_rate > 0) == isinstance(task, AttributeMaskingTask)
        assert bool(data.augment) == isinstance(task, ContrastiveTask)
        config = task.model_class.config_class.from_preset(task.preset, **task.overrides)
        assert task.model_class(config).num_params() > 0 and cli.trainer.max_steps > task.warmup_steps
        return
    if isinstance(task, ClassificationTask):
        assert isinstance(data, ClassificationDataModule)
        config = family(task.backbone).config_class.from_preset(task.preset, **task.overrides)
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
