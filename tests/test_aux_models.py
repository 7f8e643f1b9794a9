"""Auxiliary frozen models (PretrainTask.aux_models), through the distillation task's teacher: loaded from a checkpoint,
frozen, kept out of the optimizer and the checkpoints, checked on resume, sharded by FSDP2 and ZeRO-3 like the
trained model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from dist_fit import cli, write_config
from framework.errors import UserError
from framework.tasks.distill import DistilledCausalLMTask


class AuxProbe(L.Callback):
    """Writes, per rank, how the teacher is held (`{path}.rank{R}.json`) once the fit starts, and at its end the
    most teacher values this rank held at once after a step (`resident`: a ZeRO-3 partition is gathered for the
    teacher's forward and released after it)."""

    def __init__(self, path: str):
        self.path, self.resident = path, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        held = sum(p.data.numel() for p in pl_module.aux["teacher"].module.parameters())
        self.resident = max(self.resident, held)

    def on_train_end(self, trainer, pl_module):
        path = f"{self.path}.rank{trainer.global_rank}.json"
        with open(path) as f:
            out = json.load(f)
        with open(path, "w") as f:
            json.dump({**out, "resident": self.resident}, f)

    def on_train_start(self, trainer, pl_module):
        teacher = pl_module.aux["teacher"]
        params = dict(teacher.module.named_parameters())

        def local(p):  # this rank's part: a DTensor's shard, a ZeRO-3 partition, or the whole tensor
            return p.to_local().numel() if hasattr(p, "to_local") else p.ds_tensor.numel() if hasattr(
                p, "ds_tensor") else p.numel()
        # what the optimizer and the strategy's wrapper (DDP, DeepSpeed's engine) see: the task's own parameters
        trained = {id(p) for p in pl_module.parameters()}
        trained |= {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        out = {"sharded": all(hasattr(p, "full_tensor") for p in params.values()),
               "local": sum(local(p) for p in params.values()),
               "full": sum(getattr(p, "ds_numel", p.numel()) for p in params.values()),
               "frozen": not any(p.requires_grad for p in params.values()) and not teacher.training,
               "in_optimizer": any(id(p) in trained for p in params.values()),
               "zero3": any(hasattr(p, "ds_id") for p in params.values()),  # partitioned by ZeRO-3
               "devices": sorted({str(p.device) for p in params.values()})}
        with open(f"{self.path}.rank{trainer.global_rank}.json", "w") as f:
            json.dump(out, f)


@pytest.fixture(scope="module")
def teacher(shards, tmp_path_factory) -> Path:
    """A gpt-tiny trained for 2 steps on the same shards, copied to a file of its own."""
    from framework.commands.fit import fit

    tmp = tmp_path_factory.mktemp("teacher")
    fit(["--config", str(write_config(tmp, shards, strategy="auto", devices=1, max_steps=2))])
    path = tmp / "teacher.ckpt"
    shutil.copy(tmp / "run" / "checkpoints" / "last.ckpt", path)
    return path


def _config(tmp: Path, shards: Path, teacher: Path, max_steps: int, **kwargs: Any) -> Path:
    config = write_config(tmp, shards, max_steps=max_steps, **kwargs)
    cfg = json.loads(config.read_text())
    cfg["model"] = {"class_path": "framework.tasks.distill.DistilledCausalLMTask",
                    "init_args": {**cfg["model"]["init_args"], "preset": "gpt-tiny", "teacher": str(teacher)}}
    config.write_text(json.dumps(cfg))
    return config


def test_a_teacher_is_frozen_out_of_the_optimizer_and_the_checkpoint_and_resumes_exactly(shards, teacher, tmp_path):
    from framework.commands.fit import fit

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    probe = {"class_path": "test_aux_models.AuxProbe", "init_args": {"path": str(a / "aux")}}
    fit(["--config", str(_config(a, shards, teacher, 4, strategy="auto", devices=1, callbacks=[probe]))])
    held = json.loads((a / "aux.rank0.json").read_text())
    assert held["frozen"] and not held["in_optimizer"] and not held["sharded"] and held["local"] == held["full"]

    straight = torch.load(a / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert straight["global_step"] == 4
    assert all(k.startswith("model.") for k in straight["state_dict"]), list(straight["state_dict"])
    teacher_state = torch.load(teacher, map_location="cpu", weights_only=False)["state_dict"]
    assert len(straight["state_dict"]) == len(teacher_state)  # the student's own tensors only, not twice as many
    n_params = sum(len(g["params"]) for g in straight["optimizer_states"][0]["param_groups"])
    assert n_params == len(straight["optimizer_states"][0]["state"]) == sum(
        1 for k in straight["state_dict"] if k != "model.lm_head.weight")  # tied to wte: one parameter
    record = straight["aux_models"]["teacher"]
    assert record["path"] == str(teacher.resolve()) and set(record["tensors"]) >= {"transformer.wte.weight"}

    # stopped after step 2 and resumed: the same weights, bit for bit
    fit(["--config", str(_config(b, shards, teacher, 4, strategy="auto", devices=1, stop_at=2))])
    fit(["--config", str(_config(b, shards, teacher, 4, strategy="auto", devices=1)), "--ckpt_path", "last"])
    resumed = torch.load(b / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 4
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name

    # the teacher changes under the run: resuming is refused in one line
    changed = torch.load(teacher, map_location="cpu", weights_only=False)
    changed["state_dict"]["model.transformer.wte.weight"] += 0.01
    other = tmp_path / "teacher.ckpt"
    torch.save(changed, other)
    with pytest.raises(UserError) as e:
        fit(["--config", str(_config(b, shards, other, 6, strategy="auto", devices=1)), "--ckpt_path", "last"])
    assert "\n" not in str(e.value) and "the auxiliary model 'teacher'" in str(e.value), str(e.value)


def test_plan_counts_a_teacher_in_the_weights_not_the_optimizer(teacher):
    from framework.commands.plan import describe_model, estimate
    from framework.tasks.aux import aux_parameters

    counts = aux_parameters(DistilledCausalLMTask, {"teacher": str(teacher)})
    state = torch.load(teacher, map_location="cpu", weights_only=False)["state_dict"]
    assert counts == {"teacher": sum(t.numel() for k, t in state.items() if k != "model.lm_head.weight")}  # tied
    assert aux_parameters(DistilledCausalLMTask, {"teacher": None}) == {}
    student = describe_model("gpt-tiny", seq_len=32)
    with_teacher = describe_model("gpt-tiny", seq_len=32, aux_params=counts["teacher"])
    for strategy, share in (("ddp", 1), ("fsdp", 2), ("deepspeed_stage_3", 1)):
        base = estimate(student, strategy, seq_len=32, micro_batch=1, gpus=2)
        more = estimate(with_teacher, strategy, seq_len=32, micro_batch=1, gpus=2)
        assert more.states - base.states == pytest.approx(4 * counts["teacher"] / share)


def test_plan_reads_a_teacher_from_a_fit_config(teacher, tmp_path, capsys):
    import yaml

    from framework.commands.plan import main

    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "framework.tasks.distill.DistilledCausalLMTask",
                                                "init_args": {"preset": "gpt-tiny", "teacher": str(teacher)}}, "data": {"init_args": {"seq_len": 32}}}))
    main(["--config", str(config), "--gpus", "2"])
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("gpt-tiny: 0.00B parameters (+ 0.00B frozen auxiliary), seq 32"), header


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_stage_3"])
def test_two_ranks_shard_or_replicate_the_teacher(strategy, shards, teacher, tmp_path):
    """FSDP2 shards the teacher over the ranks like the trained model, ZeRO-3 partitions it (an inference engine of
    its own); DDP holds a full copy on each rank, outside the trained model's wrapper, as ZeRO-1/2 do (the same
    branch of framework/tasks/aux.py load_frozen as DDP; ZeRO-3 covers the teacher kept out of a DeepSpeed engine). No
    strategy's checkpoint holds it."""
    probe = {"class_path": "test_aux_models.AuxProbe", "init_args": {"path": str(tmp_path / "aux")}}
    # tensors under DeepSpeed's persistence threshold (1e5 values by default: all of a gpt-tiny's) stay gathered
    # once used; 0 makes every one of them go back to its partition after each forward
    config = _config(tmp_path, shards, teacher, 3, strategy=strategy, devices=2, callbacks=[probe])
    if strategy == "deepspeed_stage_3":
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        config.write_text(json.dumps({**json.loads(config.read_text()), "distributed": {"deepspeed_config": str(ds)}}))
    r = cli("fit", "--config", str(config), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    held = [json.loads((tmp_path / f"aux.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(h["frozen"] and not h["in_optimizer"] for h in held), held
    if strategy == "fsdp":
        assert all(h["sharded"] for h in held), held
        assert held[0]["local"] + held[1]["local"] == held[0]["full"] and held[0]["local"] < held[0]["full"]
    elif strategy == "deepspeed_stage_3":  # each rank's partitions: half of every tensor (rounded up), never whole
        assert all(h["zero3"] for h in held), held
        assert all(h["full"] / 2 <= h["local"] < 0.6 * h["full"] for h in held), held
        assert all(h["resident"] == 0 for h in held), held  # nothing left gathered after the teacher's forwards
    else:
        assert all(not h["sharded"] and not h["zero3"] and h["local"] == h["full"] > 0 for h in held), held
    from framework.checkpoint.reader import checkpoint_meta, model_tensors

    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    names = {s.name for s in model_tensors(ckpt)}
    assert "transformer.wte.weight" in names and len(names) <= len(
        torch.load(teacher, map_location="cpu", weights_only=False)["state_dict"])
    assert checkpoint_meta(ckpt)["aux_models"]["teacher"]["path"] == str(teacher.resolve())
