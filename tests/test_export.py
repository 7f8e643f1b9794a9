"""`pretrain export`: checkpoints of every strategy -> model.safetensors + config.json + tokenizer.json.

The distributed cases fit a tiny GPT on 2 ranks (subprocess, gloo on CPU); at the end of the fit a test callback
(tests/dist_fit.py LogitsProbe) runs a fixed input through the live, still sharded model. The exported directory,
loaded with `GPT.from_pretrained` in this process, must give the same logits.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest
import torch

from dist_fit import cli, fit, write_config
from framework.callbacks.checkpointing import peek
from framework.checkpoint.consolidate import TensorSource
from framework.checkpoint.export import export
from framework.checkpoint.safetensors_stream import save_safetensors
from framework.errors import UserError
from framework.models import GPT, Encoder, from_pretrained

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
# (strategy, model family): every strategy with the GPT; the sharding ones with the masked-LM encoder too
# every checkpoint layout; the FSDP2 one with the encoder only (the GPT's names go the same way)
CASES = [("ddp", "gpt"), ("deepspeed_stage_2", "gpt"), ("deepspeed_stage_3", "gpt"), ("fsdp", "bert"),
         ("deepspeed_stage_3", "bert")]
PARAMS = {"gpt": 124_672, "bert": 129_280}  # gpt-tiny / bert-test with the 261-token byte vocabulary (padded to 320)


@pytest.fixture(scope="module")
def shards(text_shards) -> Path:
    """The common corpus (conftest.py) with a val split."""
    return text_shards("words", 0.2)


@pytest.fixture(scope="module")
def fitted(shards, tmp_path_factory):
    """strategy -> the run directory of a 4-step fit on 2 ranks (made on first use, shared by this module's tests)."""
    runs: dict[str, Path] = {}

    def get(strategy: str, family: str = "gpt") -> Path:
        if (strategy, family) not in runs:
            if strategy.startswith("deepspeed"):
                if not HAS_DEEPSPEED:
                    pytest.skip("deepspeed is not installed (pip install deepspeed)")
            tmp = tmp_path_factory.mktemp(f"{strategy}-{family}")
            probe = {"class_path": "dist_fit.LogitsProbe", "init_args": {"path": str(tmp / "logits.pt")}}
            fit(write_config(tmp, shards, strategy=strategy, devices=2, max_steps=4, callbacks=[probe], family=family))
            runs[strategy, family] = tmp
        return runs[strategy, family]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("strategy,family", CASES)
def test_export_gives_the_live_models_logits(strategy, family, fitted, shards, tmp_path):
    run = fitted(strategy, family)
    ckpt = run / "run" / "checkpoints" / "last.ckpt"  # a file (ddp) or a directory (fsdp, deepspeed): all sharded
    out = tmp_path / "exported"
    r = cli("export", str(ckpt), str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"exported a '{family}' model: {PARAMS[family]:,} parameters" in r.stdout and "(step 4)" in r.stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == (shards / "tokenizer.json").read_text()
    assert not list(tmp_path.glob(".exported*")), "a temporary directory was left behind"

    live = torch.load(run / "logits.pt")
    model = from_pretrained(out).eval()
    assert type(model) is {"gpt": GPT, "bert": Encoder}[family]
    with torch.no_grad():
        logits = model(live["input"])
    torch.testing.assert_close(logits, live["logits"], rtol=0, atol=1e-5)
    # the W&B run id is readable from every layout without loading tensors
    assert len(peek(str(ckpt), "wandb_run_id")) == 8


@pytest.mark.slow
def test_generate_from_export_and_from_a_sharded_checkpoint(fitted, tmp_path):
    run = fitted("deepspeed_stage_3")
    ckpt, out = run / "run" / "checkpoints" / "last.ckpt", tmp_path / "exported"
    assert cli("export", str(ckpt), str(out)).returncode == 0
    args = ["--prompt", "alpha", "--max-new-tokens", "12", "--seed", "3"]
    from_dir = cli("generate", "--model", str(out), *args)
    assert from_dir.returncode == 0, from_dir.stderr[-3000:]
    assert from_dir.stdout.startswith("alpha")
    from_ckpt = cli("generate", "--ckpt", str(ckpt), *args)  # the ZeRO-3 directory, consolidated on the fly
    assert from_ckpt.returncode == 0, from_ckpt.stderr[-3000:]
    assert from_ckpt.stdout == from_dir.stdout


@pytest.mark.slow
def test_validate_a_zero3_checkpoint_on_another_world_size(fitted, shards, tmp_path):
    """`pretrain validate` loads a 2-rank ZeRO-3 checkpoint into 1 rank (weights only, framework.checkpoint.reshard):
    the model it validates gives the logits the trained model gave."""
    run = fitted("deepspeed_stage_3")
    probe = {"class_path": "dist_fit.LogitsProbe", "init_args": {"path": str(tmp_path / "logits.pt")}}
    config = write_config(tmp_path, shards, strategy="deepspeed_stage_3", devices=1, max_steps=4, callbacks=[probe],
                          limit_val_batches=2)
    r = cli("validate", "--config", str(config), "--ckpt_path", str(run / "run" / "checkpoints" / "last.ckpt"),
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "val/loss" in r.stdout
    validated, trained = torch.load(tmp_path / "logits.pt"), torch.load(run / "logits.pt")
    torch.testing.assert_close(validated["logits"], trained["logits"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_overwrite_and_atomic_replacement(fitted, tmp_path, monkeypatch):
    ckpt = fitted("ddp") / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "model"
    out.mkdir()  # an empty directory is fine
    export(ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="is not empty; pass --overwrite"):
        export(ckpt, out)
    (out / "stale.txt").write_text("from an older export")
    export(ckpt, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # replaced as a whole: stale.txt is gone

    # a failure halfway through writing the weights leaves the previous export as it was, and no temporary files
    from framework.checkpoint.reader import Checkpoint

    real = Checkpoint.tensors

    def failing(self):
        sources = real(self)
        s = sources[1]  # the second tensor, so that the first is already written
        sources[1] = TensorSource(s.name, s.shape, s.dtype, _disk_full)
        return sources

    monkeypatch.setattr(Checkpoint, "tensors", failing)
    with pytest.raises(OSError, match="No space left"):
        export(ckpt, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _disk_full() -> torch.Tensor:
    raise OSError(28, "No space left on device")


@pytest.mark.slow
def test_weights_that_do_not_match_the_config_are_refused(fitted, tmp_path):
    state = torch.load(fitted("ddp") / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    state["model_config"]["n_layer"] = 3
    torch.save(state, tmp_path / "edited.ckpt")
    with pytest.raises(UserError, match=r"do not match its model_config \(missing: transformer.h.2"):
        export(tmp_path / "edited.ckpt", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.ckpt"]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")  # a Lightning-like file without our model_config
    (tmp_path / "somedir").mkdir()
    cases = {
        str(tmp_path / "missing.ckpt"): "does not exist",
        str(tmp_path / "notes.txt"): "cannot read checkpoint",
        str(tmp_path / "foreign.ckpt"): "has no model_config",
        str(tmp_path / "somedir"): "is a directory but not a checkpoint",
    }
    for ckpt, fragment in cases.items():
        with pytest.raises(UserError, match=fragment):
            export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    r = cli("export", str(tmp_path / "missing.ckpt"), str(tmp_path / "out"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not exist" in errors[0] and "Traceback" not in r.stderr


def test_streamed_safetensors_load_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a.weight": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2).to(torch.bfloat16), "empty": torch.zeros(0, 4), "flag": torch.tensor([True])}
    sources = [TensorSource(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()]
    save_safetensors(tmp_path / "t.safetensors", sources, metadata={"format": "pt"})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    raw = (tmp_path / "t.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"format": "pt"}


class RunsCodeWhenUnpickled:
    """What a malicious checkpoint carries: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    state = {"state_dict": {"model.transformer.wte.weight": torch.zeros(2, 2)},
             "model_config": {"model_type": "gpt"}, "payload": RunsCodeWhenUnpickled(marker)}
    torch.save(state, tmp_path / "evil.ckpt")
    for args in (["export", str(tmp_path / "evil.ckpt"), str(tmp_path / "out")],
                 ["generate", "--ckpt", str(tmp_path / "evil.ckpt")],
                 ["fill-mask", "--ckpt", str(tmp_path / "evil.ckpt"), "--text", "a<|mask|>"]):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "refusing to unpickle" in errors[0] and "--trust-checkpoint" in errors[0], errors
        assert "posix.system" in errors[0] or "os.system" in errors[0], errors
    assert not marker.exists()  # nothing ran
