"""`--model.init_from`: a new run starts from the weights of any checkpoint or export, and only from the weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dist_fit import cli, fit, write_config
from framework.checkpoint.export import export
from framework.models import from_pretrained

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def pretrained(shards, gpt_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """A masked-LM encoder trained 3 steps on 2 ranks under ZeRO-3 (the layout farthest from a plain state dict), its
    export, and a GPT checkpoint (conftest.py's, for the family check)."""
    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install deepspeed)")
    tmp = tmp_path_factory.mktemp("pretrained")
    fit(write_config(tmp, shards, strategy="deepspeed_stage_3", devices=2, max_steps=3, family="bert"))
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    export(ckpt, tmp / "exported")
    return {"ckpt": ckpt, "export": tmp / "exported", "gpt": gpt_checkpoint}


@pytest.mark.slow
# ddp and ZeRO-3 (and the export as a source) are covered by the fine-tuning test below, which loads the same way
@pytest.mark.parametrize("strategy,source", [("fsdp", "ckpt")])
def test_a_new_run_starts_from_the_pretrained_weights(strategy, source, pretrained, shards, tmp_path):
    probe = {"class_path": "dist_fit.WeightsProbe", "init_args": {"path": str(tmp_path / "start.pt")}}
    config = write_config(tmp_path, shards, strategy=strategy, devices=2, max_steps=1, callbacks=[probe],
                          family="bert")
    r = cli("fit", "--config", str(config), "--model.init_args.init_from", str(pretrained[source]), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    expected = from_pretrained(pretrained["export"]).state_dict()
    started = torch.load(tmp_path / "start.pt")
    assert started["global_step"] == 0  # weights only: the step (and optimizer, schedule, data position) start fresh
    assert set(started["weights"]) == set(expected) - {"mlm_head.decoder.weight"}
    for name, value in started["weights"].items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert f"init_from {pretrained[source]}: loaded {len(started['weights'])} tensors (129,280 values)" in r.stdout
    assert "new (fresh init): none" in r.stdout and "dropped (not in this model): none" in r.stdout
    # a new W&B run, not the pre-training one
    run_ids = {p.name for p in (tmp_path / "run" / "wandb").glob("offline-run-*")}
    assert len(run_ids) == 1


@pytest.fixture(scope="module")
def labelled(pretrained, tmp_path_factory) -> Path:
    """Labelled shards tokenized with the tokenizer recorded in the pre-trained checkpoint (`--tokenizer CKPT`)."""
    from framework.data.prepare import prepare
    from corpora import labelled_jsonl

    src = tmp_path_factory.mktemp("labelled")
    labelled_jsonl(src / "docs.jsonl", docs=60)
    manifest = prepare([str(src / "docs.jsonl")], src / "data", tokenizer=str(pretrained["ckpt"]), val_fraction=0.0,
                       progress=False, labels="topic")
    assert manifest["tokenizer"]["spec"] == "checkpoint:last.ckpt"
    return src / "data"


@pytest.mark.slow
@pytest.mark.parametrize("strategy,source,mode", [("ddp", "ckpt", "lora"), ("fsdp", "ckpt", "full"),
                                                  ("deepspeed_stage_3", "export", "linear")])
def test_fine_tuning_starts_from_the_pretrained_backbone(strategy, source, mode, pretrained, labelled, tmp_path):
    probe = {"class_path": "dist_fit.WeightsProbe", "init_args": {"path": str(tmp_path / "start.pt")}}
    config = write_config(tmp_path, labelled, strategy=strategy, devices=2, max_steps=2, callbacks=[probe],
                          family="classify")
    r = cli("fit", "--config", str(config), "--model.init_args.init_from", str(pretrained[source]),
            "--model.init_args.mode", mode, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    expected = from_pretrained(pretrained["export"]).state_dict()
    started = torch.load(tmp_path / "start.pt")
    trunk = {n for n in expected if n.startswith("transformer.")}
    new = {"head.weight", "head.bias"} | ({n for n in started["weights"] if ".lora_" in n} if mode == "lora" else set())
    assert set(started["weights"]) == trunk | new
    for name in trunk:
        torch.testing.assert_close(started["weights"][name], expected[name], rtol=0, atol=0, msg=name)
    assert f"init_from {pretrained[source]}: loaded {len(trunk)} tensors" in r.stdout
    assert "new (fresh init): head.bias, head.weight" in r.stdout or (mode == "lora" and "head.bias" in r.stdout)
    assert "dropped (not in this model): mlm_head" in r.stdout
    if mode == "lora":  # the export merges the adapters into plain weights that compute the same function
        from framework.checkpoint.reader import checkpoint_meta, model_tensors
        from framework.models import build_model, config_from_dict

        ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
        export(ckpt, tmp_path / "merged")
        live = build_model(config_from_dict(checkpoint_meta(ckpt)["model_config"]))
        live.load_state_dict({t.name: t.load() for t in model_tensors(ckpt)})
        merged = from_pretrained(tmp_path / "merged")
        assert merged.config.lora_rank == 0 and not any(".lora_" in n for n in merged.state_dict())
        tokens, lengths = torch.randint(0, 256, (3, 20)), torch.tensor([20, 5, 11])
        torch.testing.assert_close(merged.eval()(tokens, lengths), live.eval()(tokens, lengths), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_another_family_or_shape_is_one_line(pretrained, shards, tmp_path):
    from test_fit import run_main

    # one process without a process group: the errors come before any training, so run them in this process
    config = write_config(tmp_path, shards, strategy="auto", devices=1, max_steps=1, family="bert")
    for args, fragment in (
        (["--model.init_args.init_from", str(pretrained["gpt"])], "holds a 'gpt' model but this task builds a 'bert'"),
        (["--model.init_args.init_from", str(pretrained["ckpt"]), "--model.init_args.config", "{n_embd: 32}"],
         "does not fit this model's shapes"),
        (["--model.init_args.init_from", str(tmp_path / "missing")], "does not exist"),
    ):
        r = run_main("fit", "--config", str(config), *args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stderr[-3000:])
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and fragment in errors[0] and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert json.loads((pretrained["export"] / "config.json").read_text())["model_type"] == "bert"
