"""A new modality and objective added from files under tests/ alone (tests/toy_points.py: a prepare through the public
shard writer, a datamodule on the shared base, a model family registered through the registry's public call, a
task), fitted with `pretrain fit` and resumed exactly, with no file of framework/ touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from framework.checkpoint.reader import open_checkpoint
from framework.commands.fit import fit
from framework.data.writer import verify
from framework.errors import UserError
from framework.models.registry import build_model, config_from_dict
from recorder import StepRecorder  # noqa: F401  # the config names it
from toy_points import PointMLP, prepare_points

STEPS = 12


def write_config(tmp: Path, data: Path, **over) -> Path:
    config = {
        "seed_everything": 3,
        "model": {"class_path": "toy_points.PointTask",
                  "init_args": {"preset": "point-mlp-test", "lr": 0.05, "warmup_steps": 0, "weight_decay": 0.0}},
        "data": {"class_path": "toy_points.PointDataModule",
                 "init_args": {"path": str(data), "batch_size": 16, "num_workers": 1}},
        "trainer": {"default_root_dir": str(tmp / "run"), "accelerator": "cpu", "devices": 1, "max_steps": STEPS,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "val_check_interval": 6,
                    "check_val_every_n_epoch": None,
                    "callbacks": [{"class_path": "recorder.StepRecorder",
                                   "init_args": {"path": str(tmp / "steps.jsonl")}}]},
        "checkpoint": {"every_n_steps": 6, "keep": 2},
        "wandb": {"mode": "disabled"},
    }
    config["trainer"].update(over)
    (tmp / "config.json").write_text(json.dumps(config))
    return tmp / "config.json"


def steps(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def points(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("points") / "data"
    manifest = prepare_points(out, 500)
    assert manifest["modality"] == "points" and verify(out) == []
    assert len(manifest["splits"]["train"]["shards"]) > 1  # several shards: the global order spans them
    return out


def test_a_toy_modality_and_objective_fit_and_resume_exactly(points, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    fit(["--config", str(write_config(a, points))])
    fit(["--config", str(write_config(b, points)), "--trainer.callbacks.init_args.stop_at", "6"])
    assert (b / "run" / "checkpoints" / "step0000006.ckpt").exists()
    fit(["--config", str(write_config(b, points)), "--ckpt_path", "last"])
    straight, resumed = steps(a), steps(b)
    assert [s["step"] for s in resumed] == list(range(STEPS))
    assert [s["sample_ids"] for s in resumed] == [s["sample_ids"] for s in straight]  # the same points, in order
    assert [s["loss"] for s in resumed] == [s["loss"] for s in straight]  # exact: data, RNG, optimizer, schedule
    assert straight[-1]["loss"] < straight[0]["loss"]  # it learns

    ckpt = open_checkpoint(b / "run" / "checkpoints" / "last.ckpt")
    assert ckpt.model_config["model_type"] == "point-mlp" and ckpt.step == STEPS
    weights_a = open_checkpoint(a / "run" / "checkpoints" / "last.ckpt").state_dict()
    for name, tensor in ckpt.state_dict().items():
        assert torch.equal(tensor, weights_a[name]), name  # bit-equal to the uninterrupted run's
    model = build_model(config_from_dict(ckpt.model_config))  # the registry builds the toy family back
    model.load_state_dict(ckpt.state_dict())
    assert isinstance(model, PointMLP)


def test_the_toy_datamodule_refuses_text_shards_in_one_line(tmp_path):
    from framework.data.prepare import prepare
    from toy_points import PointDataModule

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello " * 100)
    prepare([str(tmp_path / "corpus")], tmp_path / "text", val_fraction=0.0, progress=False)
    with pytest.raises(UserError, match="describes text shards, not points"):
        PointDataModule(path=str(tmp_path / "text")).setup("fit")
