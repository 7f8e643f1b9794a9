"""`pretrain fit` end to end on CPU: a tiny GPT on a tiny corpus, checkpoints, exact resume, W&B run continuity."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.commands.fit import fit, validate

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def shards(text_shards) -> Path:
    """A few hundred KB of varied text, prepared with the byte tokenizer (conftest.py, shared by the run)."""
    return text_shards("lines", 0.1)


def write_config(tmp: Path, shards: Path, **over) -> Path:
    config = {
        "seed_everything": 7,
        "model": {"class_path": "framework.tasks.causal_lm.CausalLMTask",
                  "init_args": {"preset": "gpt-tiny", "config": {"dropout": 0.1}, "lr": 3e-3, "warmup_steps": 2}},
        "data": {"path": str(shards), "seq_len": 32, "batch_size": 4, "num_workers": 1, "shuffle_block": 16},
        "trainer": {"default_root_dir": str(tmp / "run"), "accelerator": "cpu", "devices": 1, "max_steps": 8,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "val_check_interval": 4, "check_val_every_n_epoch": None, "limit_val_batches": 2,
                    "callbacks": [{"class_path": "recorder.StepRecorder",
                                   "init_args": {"path": str(tmp / "steps.jsonl")}}]},
        "checkpoint": {"every_n_steps": 4, "keep": 2},
        "summary": {"sample_tokens": 8, "baseline": True},
        "wandb": {"mode": "offline"},
    }
    for key, value in over.items():  # "section__name": one value; "section": the whole section
        if "__" in key:
            section, name = key.split("__")
            config[section][name] = value
        else:
            config[key] = value
    path = tmp / "config.json"
    path.write_text(json.dumps(config))
    return path


def steps(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_exactly(shards, tmp_path):
    """fp32 on CPU: 8 steps straight == 4 steps + resume from last + 4 steps, loss for loss and token for token."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    fit(["--config", str(write_config(a, shards))])
    fit(["--config", str(write_config(b, shards)), "--trainer.callbacks.init_args.stop_at", "4"])
    ckpt = b / "run" / "checkpoints"
    assert (ckpt / "last.ckpt").exists() and (ckpt / "step0000004.ckpt").exists()
    fit(["--config", str(write_config(b, shards)), "--ckpt_path", "last"])
    straight, resumed = steps(a), steps(b)
    assert [s["step"] for s in resumed] == list(range(8))
    assert [s["tokens"] for s in resumed] == [s["tokens"] for s in straight]
    assert [s["loss"] for s in resumed] == [s["loss"] for s in straight]  # exact: same data, RNG, optimizer, LR

    # the resumed run continued the same W&B run, and every checkpoint knows it
    # run folders are offline-run-DATE_TIME-ID, with "-1" appended when two start in the same second
    ids = [re.match(r"offline-run-\d+_\d+-([a-z0-9]+)", p.name).group(1)
           for p in sorted((b / "run" / "wandb").glob("offline-run-*"))]
    assert len(ids) == 2 and ids[0] == ids[1]
    # and W&B holds every step's train/loss once, the first ones included (logged while its run was still starting
    # in the background), with the config
    from wandb_records import config_keys, history

    files = [next(p.glob("*.wandb")) for p in sorted((b / "run" / "wandb").glob("offline-run-*"))]
    logged = [(r["trainer/global_step"], r["train/loss"]) for f in files for r in history(f) if "train/loss" in r]
    assert [step for step, _ in logged] == list(range(8))
    assert [loss for _, loss in logged] == pytest.approx([s["loss"] for s in resumed], rel=1e-6)
    assert {"config", "lr", "git_sha"} <= config_keys(files[0])
    last = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["wandb_run_id"] == ids[0]
    assert last["global_step"] == 8 and "tokenizer_json" in last and last["model_config"]["n_layer"] == 2
    # tokens_seen kept counting across the resume: 8 steps x 4 windows x 32 trained tokens
    assert last["callbacks"]["Throughput"]["tokens_seen"] == 8 * 4 * 32
    # the K=2 newest step checkpoints are kept (the final step 8 coincides with a periodic save)
    assert sorted(p.name for p in ckpt.glob("step*.ckpt")) == ["step0000004.ckpt", "step0000008.ckpt"]

    # the newest checkpoint damaged on disk (torn by a failing disk, or a copy cut short): `last` falls back to the
    # previous one with a warning naming the bad file, and training from there repeats steps 4-7 exactly
    newest = ckpt / "step0000008.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"resuming from .*step0000004\.ckpt.*step0000008\.ckpt"):
        fit(["--config", str(write_config(b, shards)), "--ckpt_path", "last"])
    again = steps(b)[8:]
    assert [s["step"] for s in again] == [4, 5, 6, 7]
    assert [s["loss"] for s in again] == [s["loss"] for s in straight[4:]]


def test_fit_trains_validates_and_summarises(shards, tmp_path, capsys):
    fit(["--config", str(write_config(tmp_path, shards, trainer__max_steps=6, summary__sample_tokens=100))])
    out = capsys.readouterr().out
    assert "run summary" in out and "unigram baseline" in out and "wandb sync" in out
    sample = out.split("sample:\n")[1].split("-" * 73)[1].strip("\n")
    # 100 tokens asked, the sample stays within gpt-tiny's context (seq_len 64; a byte token decodes to <= 1 char)
    assert sample.startswith("def ") and 20 < len(sample) <= 64
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step*.ckpt"))
    assert ckpts == ["step0000004.ckpt", "step0000006.ckpt"]  # every 4 steps and at the end
    logged = steps(tmp_path)
    assert logged[-1]["loss"] < logged[0]["loss"]


def test_generate_from_a_checkpoint(gpt_checkpoint, tmp_path):
    ckpt = gpt_checkpoint  # a 1-step fit (conftest.py, shared by the run)
    r = run_cli("generate", "--ckpt", str(ckpt), "--prompt", "alpha", "--max-new-tokens", "10", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    # the same greedy continuation from a GPT built by hand from the checkpoint's config and state dict
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    from framework.data.tokenizer import Tokenizer
    from framework.models import GPT, GPTConfig

    model = GPT(GPTConfig.from_dict(state["model_config"])).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()})
    tok = Tokenizer.from_str(state["tokenizer_json"])
    out = model.generate(torch.tensor([tok.encode("alpha")]), 10, temperature=0.0, eos_id=tok.special_ids["eod"])
    assert r.stdout.rstrip("\n") == tok.decode([t for t in out[0].tolist() if t != tok.special_ids["eod"]])
    # without the tokenizer it carried, generate says where to find one
    del state["tokenizer_json"]
    torch.save(state, tmp_path / "bare.ckpt")
    r = run_cli("generate", "--ckpt", str(tmp_path / "bare.ckpt"), "--prompt", "a")
    assert_one_line_error(r, "carries no tokenizer; pass --tokenizer")


@pytest.mark.slow
def test_fit_with_torch_compile(shards, tmp_path):
    """Compiled and eager training take the same steps (same losses), and the uncompiled module's names are saved."""
    losses = {}
    for name, args in (("eager", []), ("compiled", ["--model.init_args.compile", "true"])):
        run = tmp_path / name
        run.mkdir()
        # no dropout: compiled code draws its random numbers differently
        fit(["--config", str(write_config(run, shards, trainer__max_steps=3)), "--model.init_args.config",
             "{dropout: 0.0}", *args])
        losses[name] = [s["loss"] for s in steps(run)]
    assert len(losses["eager"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=1e-4)
    saved = torch.load(tmp_path / "compiled" / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)
    assert not any("_orig_mod" in k for k in saved["state_dict"])


def test_validate_a_checkpoint(shards, tmp_path, capsys):
    """`pretrain validate` of the last checkpoint gives the val loss the fit computed with those weights (it would
    not if the weights were not loaded: a fresh model's loss is ~5.6 nats, the trained one's far lower)."""
    fit(["--config", str(write_config(tmp_path, shards, trainer__max_steps=4))])  # validates at step 4, saves step 4
    fitted = float(re.search(r"val/loss:\s+([\d.]+)", capsys.readouterr().out).group(1))
    validate(["--config", str(write_config(tmp_path, shards)),
              "--ckpt_path", str(tmp_path / "run" / "checkpoints" / "last.ckpt")])
    out = capsys.readouterr().out
    assert "val/loss" in out and "val/ppl" in out, out
    # Lightning's results table (drawn with rich's box characters when rich is installed)
    validated = float(re.search(r"^[\s│|]*val/loss[\s│|]+([\d.]+)[\s│|]*$", out, re.M).group(1))
    assert validated == pytest.approx(fitted, abs=1e-4)


def test_a_nan_validation_batch_makes_val_loss_nan_and_warns(shards, tmp_path, capsys):
    """Divergence must show: one NaN batch makes the (count-weighted) val/loss NaN, with a warning, not a finite mean
    of the other batches."""
    with pytest.warns(UserWarning, match="val/loss is nan"):
        fit(["--config", str(write_config(tmp_path, shards, trainer__max_steps=4)),
             "--model.class_path", "recorder.DivergingValidationTask"])
    assert re.search(r"val/loss:\s+nan", capsys.readouterr().out)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`pretrain ARGS` as a fresh shell would run it: without this process's W&B service (an in-process fit
    started one, and WANDB_SERVICE would make the child register its runs there, outliving a killed child).

    In its own session, with its output in files rather than pipes: a SIGKILLed run leaves its children behind (a
    data worker until it notices, a W&B service started moments before the kill), and they would hold a pipe open
    for as long as they live. Once the run itself has exited, whatever is left of its session is killed."""
    import signal
    import tempfile

    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "WANDB_MODE": "offline",
           "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    cmd = [sys.executable, "-m", "framework", *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=cwd, start_new_session=True)
        try:
            proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def test_a_w_and_b_service_of_the_launching_process_is_not_used(shards, tmp_path):
    """W&B exports WANDB_SERVICE (the address of its service, a Unix socket) to the children of a process that uses
    it. A job started from such a process (a notebook, a test runner; sbatch passes the variable on) would register
    its run with a service that is not its own: on another host it cannot be reached, and on a requeue it may still
    hold the run of the attempt that was killed ("run ID ... is in use"). `pretrain` starts its own instead."""
    config = write_config(tmp_path, shards, trainer__max_steps=1, trainer__val_check_interval=1, summary={
        "sample_tokens": 0})
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SERVICE": "3-1-unix-/nonexistent/wandb-service.sock",
           "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    r = subprocess.run([sys.executable, "-m", "framework", "fit", "--config", str(config)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0, (files, r.stderr[-3000:])
    assert "could not" not in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]


def run_main(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`pretrain ARGS` in this process (for input that fails before any training: no ~6 s of imports per call),
    with what it printed and its exit status, as run_cli returns them."""
    import contextlib
    import io

    from framework.commands import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def assert_one_line_error(r: subprocess.CompletedProcess, fragment: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--model.init_args.preset", "gpt2-124mm"], "did you mean 'gpt2-124m'"),
    (["--model.lrr", "1"], "unknown config key 'model.lrr' (did you mean 'lr'?)"),
    (["--trainer.max_step", "3"], "did you mean 'max_steps'"),
    (["--model.init_args.config", "{vocab_size: 100}"], "set model.config.vocab_size >= 261"),
    (["--data.init_args.seq_len", "65"], "data.seq_len=65 is longer than the model's context (seq_len=64)"),
    (["--data.path", "/nonexistent/shards"], "does not exist"),
    (["--ckpt_path", "/nonexistent.ckpt"], "checkpoint '/nonexistent.ckpt' does not exist"),
    (["--trainer.devices", "0"], "the trainer settings are invalid: `Trainer(devices='0')`"),
], ids=["preset", "key", "abbreviation", "vocab", "context", "data-dir", "ckpt", "devices-0"])
def test_bad_input_is_one_line_and_exit_2(shards, tmp_path, args, fragment):
    r = run_main("fit", "--config", str(write_config(tmp_path, shards)), *args, cwd=tmp_path)
    assert_one_line_error(r, fragment)


def test_missing_manifest_is_one_line_and_exit_2(shards, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("fit", "--config", str(write_config(tmp_path, shards)), "--data.path", str(empty), cwd=tmp_path)
    assert_one_line_error(r, "no manifest")


@pytest.mark.slow
def test_sigkill_in_steps_and_in_a_checkpoint_write_loses_nothing(shards, tmp_path, seed=0):
    """Chaos: a run SIGKILLed after a step, its resumed run killed again after a step, and that one killed while a
    checkpoint is being written, each time resumed with --ckpt_path last, ends with weights bit-equal to an
    uninterrupted run's, and every step's batch as it had."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    over = {"trainer__max_steps": 10, "checkpoint": {"every_n_steps": 2, "keep": 2}, "summary__sample_tokens": 0}
    fit(["--config", str(write_config(a, shards, **over))])  # in this process: only the killed runs need their own
    kills = [{"at_step": 5, "where": "step"}, {"at_step": 7, "where": "step"},
             {"at_step": 8, "where": "save", "seed": seed}]
    for i, kill in enumerate(kills):
        config = write_config(b, shards, **over)
        cfg = json.loads(config.read_text())
        cfg["trainer"]["callbacks"].append({"class_path": "recorder.KillSelf", "init_args": kill})
        config.write_text(json.dumps(cfg))
        r = run_cli("fit", "--config", str(config), *(["--ckpt_path", "last"] if i else []))
        assert r.returncode == -9, (kill, r.returncode, r.stderr[-2000:])
    fit(["--config", str(write_config(b, shards, **over)), "--ckpt_path", "last"])

    straight = torch.load(a / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    resumed = torch.load(b / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == 10
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    # each step's surviving record (the last time it was trained) is the uninterrupted run's: same batch, same loss
    final = {s["step"]: s for s in steps(b)}
    assert [(s["tokens"], s["loss"]) for s in steps(a)] == [(final[k]["tokens"], final[k]["loss"]) for k in range(10)]
    assert len(steps(b)) > 10  # steps after the last good checkpoint were trained again, and only their effect kept


def test_a_first_checkpoint_cut_off_mid_write_means_a_fresh_start(tmp_path):
    """A sharded run killed while writing its first checkpoint leaves a directory without its metadata: `last`
    then means "no checkpoint yet" (a fresh start, with a warning naming it), not an error that stops every requeue;
    a damaged file is still an error."""
    from framework.callbacks.checkpointing import find_checkpoint
    from framework.errors import UserError

    ckpts = tmp_path / "checkpoints"
    (ckpts / "step0000002.ckpt").mkdir(parents=True)
    (ckpts / "step0000002.ckpt" / "__0_0.distcp").write_bytes(b"\0" * 64)  # one rank's shard, no meta.pt yet
    with pytest.warns(UserWarning, match=r"starting afresh: no checkpoint of this run was written completely"):
        assert find_checkpoint("last", str(ckpts)) is None
    (ckpts / "step0000004.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="no readable checkpoint to resume"):
        find_checkpoint("last", str(ckpts))
