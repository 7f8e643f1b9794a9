"""Vision objectives end to end: supervised classification and CLIP train as well as a plain loop on the synthetic
shapes set, run under DDP, FSDP2 and ZeRO-2 on 2 CPU processes, and a CLIP's image tower is linearly probed through
the fine-tuning path; zero-shot evaluation and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_fit import fit
from test_fit import assert_one_line_error, run_main

SUPERVISED = "framework.tasks.vision.ImageClassificationTask"
CLIP_TASK = "framework.tasks.clip.CLIPTask"
IMAGES = "framework.data.images.ImageDataModule"


# `shapes` (conftest.py, shared by the run): the synthetic set at 32 px, 2400 images: 36 colour x shape classes,
# captions, val 0.15.


def config(tmp: Path, data: Path, task: str, init: dict, *, steps: int, data_args: dict | None = None,
           strategy: str = "auto", devices: int = 1, **trainer) -> Path:
    cfg = {
        "seed_everything": 7,
        "model": {"class_path": task, "init_args": {"lr": 3e-3, "warmup_steps": 10, "weight_decay": 0.01, **init}},
        "data": {"class_path": IMAGES, "init_args": {"path": str(data), "image_size": 32, "batch_size": 32,
                                                     "num_workers": 1, **(data_args or {})}},
        "trainer": {"default_root_dir": str(tmp / "run"), "accelerator": "cpu", "devices": devices,
                    "strategy": strategy, "max_steps": steps, "log_every_n_steps": 10, "enable_progress_bar": False,
                    "val_check_interval": steps, "check_val_every_n_epoch": None, **trainer},
        "checkpoint": {"every_n_steps": steps, "keep": 1},
        "summary": {"sample_tokens": 0},
        "wandb": {"mode": "disabled"},
    }
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def summary_value(out: str, prefix: str) -> float:
    """A percentage from the run summary's line starting with `prefix`."""
    line = next(line for line in out.splitlines() if line.startswith(prefix))
    return float(line[len(prefix):].split()[0].rstrip("%")) / 100


# ---------------------------------------------------------------- learning: as well as a plain loop
LEARN = {"steps": 240, "batch": 32, "warmup": 30}


def plain_loop(shards: Path, model: torch.nn.Module, step_loss, lr: float, captions: bool = False) -> dict:
    """The baseline: the same model trained by a minimal loop (AdamW with weight decay on matrices only, a linear
    warm-up then a constant LR, the gradient norm clipped at 1 as the framework's default; no Lightning) on the
    datamodule's batches (no augmentation); returns the datamodule and its val batches. Without the warm-up this
    CLIP collapses (every embedding alike, loss ln B) at this LR, in a plain loop as in the framework."""
    from framework.data.images import ImageDataModule

    torch.manual_seed(7)
    dm = ImageDataModule(path=str(shards), image_size=32, batch_size=LEARN["batch"], num_workers=0,
                         crop_scale=(1.0, 1.0), hflip=False, captions=captions, max_caption_tokens=30)
    dm.setup("fit")
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / (LEARN["warmup"] + 1)))
    step, steps = 0, LEARN["steps"]
    while step < steps:
        for batch in dm.train_dataloader():
            loss = step_loss(model, batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            warmup.step()
            step += 1
            if step == steps:
                break
    model.eval()
    return {"dm": dm, "batches": list(dm.val_dataloader())}


def fit_in_process(capsys, cfg: Path, *args: str) -> str:
    from framework.commands.fit import fit as run_fit

    run_fit(["--config", str(cfg), *args])
    return capsys.readouterr().out


@pytest.mark.slow
def test_supervised_learns_as_well_as_a_plain_loop(shapes, tmp_path, capsys):
    from framework.models.resnet import ResNet, ResNetConfig

    out = fit_in_process(capsys, config(tmp_path, shapes, SUPERVISED, {
        "backbone": "resnet", "backbone_preset": "resnet-test", "lr": 3e-3, "warmup_steps": LEARN["warmup"],
        "min_lr_ratio": 1.0, "betas": [0.9, 0.999]},
        steps=LEARN["steps"], data_args={"crop_scale": [1.0, 1.0], "hflip": False, "batch_size": LEARN["batch"]}))
    accuracy = summary_value(out, "val/accuracy:")
    assert "class prior baseline: 2.78%" in out and "images seen: 7,680" in out

    def loss(model, batch):
        return F.cross_entropy(model(batch["images"]), batch["labels"], ignore_index=-100)

    model = ResNet(ResNetConfig.from_preset("resnet-test", num_classes=36, image_size=32))
    val = plain_loop(shapes, model, loss, lr=3e-3)
    with torch.no_grad():
        right = sum(int((model(b["images"]).argmax(-1) == b["labels"])[b["valid"]].sum()) for b in val["batches"])
    plain = right / sum(int(b["valid"].sum()) for b in val["batches"])
    assert plain > 0.15, f"the plain loop learned too little to compare with ({plain:.3f})"
    assert accuracy > plain - 0.05, f"framework {accuracy:.3f} vs plain loop {plain:.3f}"


@pytest.fixture(scope="module")
def clip_run(shapes, tmp_path_factory) -> tuple[Path, str]:
    """A CLIP trained on the shapes' captions (LEARN steps, in this process): its run directory and console output."""
    return clip_fit(shapes, tmp_path_factory.mktemp("clip"), seed=7)


def clip_fit(shapes: Path, tmp: Path, seed: int) -> tuple[Path, str]:
    import contextlib
    import io

    from framework.commands.fit import fit as run_fit

    tmp.mkdir(parents=True, exist_ok=True)
    cfg = config(tmp, shapes, CLIP_TASK, {
        "preset": "clip-test", "lr": 1e-3, "warmup_steps": LEARN["warmup"], "min_lr_ratio": 1.0, "betas": [0.9, 0.999],
        "zero_shot_templates": ["a small {}", "a large {}"]},
        steps=LEARN["steps"], data_args={"crop_scale": [1.0, 1.0], "hflip": False, "batch_size": LEARN["batch"],
                                         "captions": True, "max_caption_tokens": 30})
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "seed_everything": seed}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_fit(["--config", str(cfg)])
    return tmp / "run", out.getvalue()


@pytest.mark.slow
def test_clip_learns_as_well_as_a_plain_loop_and_classifies_zero_shot(shapes, clip_run, tmp_path):
    """Over three seeds each (one run of each arm varies by over 20% between seeds on some CPUs: seed 7 gave 1.72
    (framework) and 1.80 (plain) on an EPYC where seeds 8 and 9 gave 1.33-1.39 and 1.30)."""
    from framework.data.tokenizer import load_tokenizer
    from framework.models.clip import CLIP, CLIPConfig
    from framework.objectives.contrastive import clip_loss
    from framework.inference import evaluate

    def measured(out: str) -> tuple[float, float]:
        return float(out.split("val/loss:")[1].split()[0]), float(out.split("zero-shot top-1: ")[1].split("%")[0]) / 100

    run, out = clip_run
    val_loss, top1 = measured(out)
    framework = [(val_loss, top1)] + [measured(clip_fit(shapes, tmp_path / f"seed{s}", seed=s)[1]) for s in (8, 9)]

    def loss(model, batch):
        images, texts, scale = model(batch["images"], batch["tokens"], batch["lengths"])
        return clip_loss(images, texts, scale, batch["valid"])[0]

    tok = load_tokenizer(shapes / "tokenizer.json")
    plain = []
    for seed in (7, 8, 9):
        torch.manual_seed(seed)
        model = CLIP(CLIPConfig.from_preset("clip-test", text={"vocab_size": tok.vocab_size},
                                            special_ids={k: v for k, v in tok.special_ids.items()
                                                         if k in ("eod", "pad", "cls", "sep")}))
        val = plain_loop(shapes, model, loss, lr=1e-3, captions=True)
        with torch.no_grad():
            # a mean over pairs, as the framework's val/loss: the last val batch is mostly filler rows, and its few
            # pairs (fewer negatives, so a lower loss) must not count as much as a full batch
            plain_loss = np.average([float(loss(model, b)) for b in val["batches"]],
                                    weights=[int(b["valid"].sum()) for b in val["batches"]])
            scores = evaluate(model, tok, val["batches"], val["dm"].class_names, ["a small {}", "a large {}"])
        plain.append((plain_loss, scores["zero_shot_top1"]))
    (fw_loss, fw_top1), (plain_loss, plain_top1) = np.mean(framework, axis=0), np.mean(plain, axis=0)
    print(f"CLIP over 3 seeds: framework val loss {fw_loss:.3f} zero-shot {fw_top1:.3f}; plain loop {plain_loss:.3f} "
          f"{plain_top1:.3f}")
    # within 15%: at this size, the plain loop's val loss alone varies between init seeds
    assert fw_loss < plain_loss * 1.15, f"framework val loss {fw_loss:.3f} vs plain loop {plain_loss:.3f}"
    assert top1 > 3 / 36, f"zero-shot top-1 {top1:.3f} is not 3x chance"
    assert fw_top1 > plain_top1 - 0.05, f"framework {fw_top1:.3f} vs plain loop {plain_top1:.3f}"

    # `pretrain zero-shot` on the checkpoint gives the validation's figure
    ckpt = run / "checkpoints" / "last.ckpt"
    r = run_main("zero-shot", "--ckpt", str(ckpt), "--data", str(shapes))
    assert r.returncode == 0, r.stderr
    assert f"zero-shot top-1: {top1:.2%}" in r.stdout, (r.stdout, top1)
    assert "retrieval: image_to_text_R@1" in r.stdout


@pytest.mark.slow
def test_a_linear_probe_of_the_clip_image_tower_trains_only_a_new_head(shapes, clip_run, tmp_path, capsys):
    from framework.checkpoint.reader import load_state_dict

    clip = run_main("export", str(clip_run[0] / "checkpoints" / "last.ckpt"), str(tmp_path / "clip-export"))
    assert clip.returncode == 0, clip.stderr
    out = fit_in_process(capsys, config(tmp_path, shapes, SUPERVISED, {
        "init_from": str(tmp_path / "clip-export"), "mode": "linear", "lr": 1e-2, "warmup_steps": 5},
        steps=60, data_args={"crop_scale": [1.0, 1.0], "hflip": False}))
    loaded = int(out.split(": loaded ")[1].split()[0])
    assert loaded == sum(1 for k in torch.load(clip_run[0] / "checkpoints" / "last.ckpt", weights_only=False)[
        "state_dict"] if k.startswith("model.visual.")), out
    assert "new (fresh init): head.bias, head.weight" in out  # the CLIP's projections and text tower are dropped
    accuracy = summary_value(out, "val/accuracy:")
    assert accuracy > 3 / 36, f"a probe of a tower that learned colours and shapes reached only {accuracy:.3f}"
    source = load_state_dict(str(clip_run[0] / "checkpoints" / "last.ckpt"))
    probe = load_state_dict(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    tower = {k[len("visual."):]: v for k, v in source.items() if k.startswith("visual.")}
    assert tower and set(probe) - set(tower) == {"head.weight", "head.bias"}
    for name, value in tower.items():  # frozen: weights and BatchNorm/other buffers as pre-trained
        assert torch.equal(probe[name], value), name
    # the probe's checkpoint keeps the new head (and buffers) only: the tower is read back from the export
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["frozen_from"]["prefix"] == "visual." and {"model.head.weight", "model.head.bias"} <= set(
        saved["state_dict"])
    assert all(k.startswith("model.head.") or k.endswith(("running_mean", "running_var", "num_batches_tracked"))
               for k in saved["state_dict"]), sorted(saved["state_dict"])


# ---------------------------------------------------------------- strategies: 2 CPU processes
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_2"])
def test_both_objectives_train_on_two_processes(shapes, tmp_path, strategy):
    """Each objective fits 3 steps on 2 ranks (FSDP2 shards ResNet stages and transformer blocks; CLIP's loss
    gathers features across the ranks), validates and checkpoints. (DDP: CLIP's gathered loss and gradients equal one
    process's in tests/test_contrastive.py, and both tasks' plumbing is the same under every strategy.)"""
    for name, task, init, data in (
            ("supervised", SUPERVISED, {"backbone": "resnet", "backbone_preset": "resnet-test"}, {}),
            ("clip", CLIP_TASK, {"preset": "clip-test", "accum_freq": 2, "zero_shot_templates": ["a small {}"]},
             {"captions": True, "max_caption_tokens": 30, "hflip": False})):
        tmp = tmp_path / name
        tmp.mkdir()
        cfg = config(tmp, shapes, task, init, steps=3, strategy=strategy, devices=2,
                     data_args={"batch_size": 8, "val_batch_size": 16, **data}, limit_val_batches=2)
        fit(cfg)
        ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
        assert ckpt.exists(), f"{strategy} {name}: no checkpoint"


def test_bad_input_is_one_line_and_exit_2(shapes, clip_checkpoint, tmp_path):
    clip_cfg = config(tmp_path, shapes, CLIP_TASK, {"preset": "clip-test"}, steps=2,
                      data_args={"captions": True, "max_caption_tokens": 30, "hflip": False})
    assert_one_line_error(run_main("fit", "--config", str(clip_cfg), "--trainer.accumulate_grad_batches", "2",
                                   cwd=tmp_path), "use model.accum_freq=2 instead")
    assert_one_line_error(run_main("fit", "--config", str(clip_cfg), "--data.init_args.captions", "false",
                                   cwd=tmp_path), "CLIPTask needs image-caption pairs")
    assert_one_line_error(run_main("fit", "--config", str(clip_cfg), "--model.init_args.accum_freq", "3",
                                   cwd=tmp_path), "not a multiple of model.accum_freq=3")
    sup_cfg = config(tmp_path, shapes, SUPERVISED, {"backbone": "vit", "backbone_preset": "vit-test"}, steps=2,
                     data_args={"image_size": 48})
    assert_one_line_error(run_main("fit", "--config", str(sup_cfg), cwd=tmp_path),
                          "data.image_size=48 but the ViT takes 32 px images")
    assert_one_line_error(run_main("fit", "--config", str(sup_cfg), "--model.init_args.mode", "linear",
                                   cwd=tmp_path), "model.mode=linear probes a pre-trained backbone")
    ckpt = str(clip_checkpoint)  # a 1-step CLIP (conftest.py): the errors come before it is used
    assert_one_line_error(run_main("zero-shot", "--ckpt", ckpt, "--data", str(shapes), "--template", "a shape"),
                          "--template must each hold one '{}'")
    assert_one_line_error(run_main("generate", "--ckpt", ckpt), "holds a 'clip' model")
    assert_one_line_error(run_main("zero-shot", "--ckpt", ckpt, "--data", str(tmp_path / "nowhere")), "nowhere")


@pytest.mark.slow
def test_the_transfer_report_probes_an_image_tower_against_a_random_one(shapes, clip_run, tmp_path):
    """`pretrain transfer-report` on image shards: the CLIP's image tower, linearly probed, against the same tower
    randomly initialised (frozen too), on the same label subsets."""
    r = run_main("transfer-report", "--pretrained", str(clip_run[0] / "checkpoints" / "last.ckpt"), "--data",
                 str(shapes), "--output", str(tmp_path / "report"), "--fractions", "0.2,1", "--modes", "linear",
                 "--seeds", "1", "--lrs", "3e-3", "--max-steps", "40", "--batch-size", "32", "--image-size", "32",
                 "--holdout", "0.1", "--accelerator", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["runs"]) == 2 * 2 + 2 and report["unit"] == "images" and report["classes"] == 36  # + classical
    full = next(row for row in report["rows"] if row["fraction"] == 1.0)
    # better than the random tower by two binomial standard errors of its accuracy on the val split (3.2 points on
    # 360 images at ~10%), not by a fixed gain: the fixture's CLIP is not the same model in every run (on one machine,
    # +9.4 points run alone and +4.7 in a whole-suite run, the random tower's score identical)
    p = full["scratch"]["score_mean"]
    margin = 2 * math.sqrt(p * (1 - p) / report["val_docs"])
    assert full["gain"] > margin, f"the pre-trained tower's features are no better than a random one's: {full}"
    assert full["classical"]["score_mean"] > 3 / 36  # logistic regression on pixels: colours are in the pixels
    assert "| 1 | 2040 (216) | linear |" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow
def test_a_resumed_clip_fit_continues_exactly(shapes, tmp_path):
    """6 steps straight == 3 steps + resume from last + 3 steps, loss for loss and caption for caption: the data
    position, the augmentation (random crops, seeded per sample), dropout's RNG and accum_freq's recompute."""
    losses = {}
    for name, stops in (("straight", [None]), ("resumed", [3, None])):
        tmp = tmp_path / name
        tmp.mkdir()
        for i, stop in enumerate(stops):
            recorder = {"class_path": "recorder.StepRecorder",
                        "init_args": {"path": str(tmp / "steps.jsonl"), "stop_at": stop}}
            cfg = config(tmp, shapes, CLIP_TASK, {"preset": "clip-test", "accum_freq": 2,
                                                  "config": {"image": {"dropout": 0.1}, "text": {"dropout": 0.1}}},
                         steps=6, data_args={"captions": True, "max_caption_tokens": 30, "batch_size": 8},
                         callbacks=[recorder], limit_val_batches=1)
            from framework.commands.fit import fit as run_fit

            run_fit(["--config", str(cfg), *(["--ckpt_path", "last"] if i else [])])
        losses[name] = [json.loads(line) for line in (tmp / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses["resumed"]] == list(range(6))
    assert losses["resumed"] == losses["straight"]
