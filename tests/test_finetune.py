"""Fine-tuning: labelled shards, whole-document batches, the classifier and its modes, and that it learns."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch

from framework.data.cursor import continue_on
from framework.data.documents import DocumentIndex, DocumentStream
from framework.data.samples import IGNORE_LABEL, stratified_subset
from framework.data.prepare import prepare
from framework.data.shards import manifest_shards
from framework.models import from_pretrained
from framework.models.classifier import ClassifierConfig, SequenceClassifier
from framework.models.transformer import LoRA, LoRALinear
from corpora import labelled_jsonl

# `labelled` (conftest.py, shared by the run): labelled_jsonl's 300 documents prepared with `--labels topic`, val 0.2


# ---------------------------------------------------------------- prepare
def test_prepare_writes_labels_beside_tokens_with_a_stratified_split(labelled):
    manifest = json.loads((labelled / "manifest.json").read_text())
    labels = manifest["labels"]
    assert labels["names"] == ["astro", "bio", "geo"] and labels["source"] == "topic"
    assert labels["counts"] == {"train": [80, 80, 80], "val": [20, 20, 20]}  # exactly 20% of each class
    with tarfile.open(labelled / "train-000000.tar") as tf:
        names = tf.getnames()
    assert names[0].endswith(".u16") and names[1].endswith(".cls") and len(names) == 2 * 240
    index = DocumentIndex(manifest_shards(manifest, "train", str(labelled)))
    assert np.bincount(index.label).tolist() == [80, 80, 80]


def test_prepare_labels_from_integers_and_from_class_folders(tmp_path):
    labelled_jsonl(tmp_path / "ints.jsonl", docs=30, int_labels=True)
    m = prepare([str(tmp_path / "ints.jsonl")], tmp_path / "a", val_fraction=0.0, progress=False, labels="topic")
    assert m["labels"]["names"] == ["0", "1", "2"]
    for label in ("cats", "dogs"):
        (tmp_path / "folders" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "folders" / label / f"{i}.txt").write_text(f"{label} text {i}")
    m = prepare([str(tmp_path / "folders")], tmp_path / "b", val_fraction=0.0, progress=False, labels="label")
    assert m["labels"]["names"] == ["cats", "dogs"] and m["labels"]["counts"]["train"] == [3, 3]


def test_the_embedded_task_is_the_held_out_packages_functions(tmp_path):
    from framework.data.prepare import HELD_OUT, TASK

    m = prepare(None, tmp_path / "task", val_fraction=0.2, progress=False, labels=TASK)
    assert m["labels"]["names"] == sorted(HELD_OUT) and m["sources"]["inputs"] == [f"<{TASK}>"]
    train, val = m["labels"]["counts"]["train"], m["labels"]["counts"]["val"]
    assert min(train) >= 50 and all(abs(v - 0.2 * (t + v)) <= 0.5 for t, v in zip(train, val))  # stratified
    with tarfile.open(tmp_path / "task" / "train-000000.tar") as tf:
        first = tf.extractfile(tf.getmembers()[0]).read()
    text = bytes(np.frombuffer(first, "<u2").astype(np.uint8)).decode()
    assert text.lstrip().startswith(("def ", "async def ", "@"))  # a whole function (bytes tokenizer: ids = bytes)


def test_the_tokenizer_can_come_from_a_data_or_export_directory(labelled, tmp_path):
    labelled_jsonl(tmp_path / "more.jsonl", docs=12)
    for source in (labelled, tmp_path / "export"):
        if source != labelled:
            source.mkdir()
            (source / "tokenizer.json").write_text((labelled / "tokenizer.json").read_text())
            (source / "config.json").write_text("{}")
        m = prepare([str(tmp_path / "more.jsonl")], tmp_path / f"out-{source.name}", tokenizer=str(source),
                    val_fraction=0.0, progress=False, labels="topic")
        assert m["tokenizer"]["sha256"] == json.loads((labelled / "manifest.json").read_text())["tokenizer"]["sha256"]


def test_a_line_without_a_label_is_one_clear_error(tmp_path):
    from test_fit import assert_one_line_error, run_cli

    (tmp_path / "x.jsonl").write_text('{"text": "a", "topic": "x"}\n{"text": "b"}\n')
    r = run_cli("prepare", "--input", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "out"),
                "--label-field", "topic")
    assert_one_line_error(r, 'x.jsonl:2: expected a label (a string or an integer) in the "topic" field')
    assert not (tmp_path / "out").exists()  # nothing half-written


# ---------------------------------------------------------------- reading whole documents
def _stream(index: DocumentIndex, units: np.ndarray, **kw) -> DocumentStream:
    return DocumentStream(index, units, max_tokens=kw.pop("max_tokens", 30), batch_size=kw.pop("batch_size", 4),
                          pad=0, vocab_size=1 << 16, **kw)


def test_documents_are_delivered_exactly_once_per_epoch_and_resume_on_another_world(labelled):
    manifest = json.loads((labelled / "manifest.json").read_text())
    index = DocumentIndex(manifest_shards(manifest, "train", str(labelled)))
    units = np.arange(len(index))
    streams = [_stream(index, units, rank=r, world=2) for r in range(2)]
    epoch = [b for s in streams for b in s]
    ids = np.concatenate([b["sample_ids"].numpy() for b in epoch])
    assert len(ids) == len(set(ids.tolist())) == 240  # 240 = 2 ranks x 30 batches x 4: no tail here
    assert sorted(ids.tolist()) != ids.tolist()  # shuffled over the whole epoch
    first = epoch[0]
    assert first["tokens"].shape[1] == int(first["lengths"].max()) <= 30  # padded to the longest, truncated

    # 5 batches per rank on 2 ranks, then the rest on 1 rank with another batch size: every document once
    seg = streams[0].fresh_segment(0)
    done = [b for s in streams for b in list(s)[:5]]
    rest_stream = _stream(index, units, batch_size=3)
    rest_stream.segment = continue_on(seg, 5, rest_stream.layout)
    rest = list(rest_stream)
    seen = np.concatenate([b["sample_ids"].numpy() for b in done + rest])
    assert len(seen) == len(set(seen.tolist())) and len(seen) >= 240 - 2  # a tail < one batch (of 3) may drop
    # each document comes with its own label
    for b in done[:3]:
        assert b["labels"].tolist() == index.label[b["sample_ids"].numpy()].tolist()


def test_validation_covers_every_document_once_with_ignored_fillers(labelled):
    manifest = json.loads((labelled / "manifest.json").read_text())
    index = DocumentIndex(manifest_shards(manifest, "val", str(labelled)))
    units = np.arange(len(index))  # 60 documents over 2 ranks x batch 7: 5 batches each, 10 fillers
    batches = [list(_stream(index, units, rank=r, world=2, batch_size=7, shuffle=False, fill=True)) for r in range(2)]
    assert len(batches[0]) == len(batches[1]) == 5
    rows = [(i, l) for bs in batches for b in bs for i, l in zip(b["sample_ids"].tolist(), b["labels"].tolist())]
    real = sorted(i for i, _ in rows if i >= 0)
    assert real == list(range(60))
    assert all(l == IGNORE_LABEL for i, l in rows if i < 0) and sum(i < 0 for i, _ in rows) == 10


def test_label_fraction_subsets_are_stratified_and_nested():
    labels = np.repeat([0, 1, 2], [500, 300, 7])
    small, large = (stratified_subset(labels, f, seed=3) for f in (0.01, 0.1))
    assert np.bincount(labels[small]).tolist() == [5, 3, 1]  # at least one of every class
    assert np.bincount(labels[large]).tolist() == [50, 30, 1]
    assert set(small.tolist()) <= set(large.tolist())
    assert not np.array_equal(stratified_subset(labels, 0.1, seed=4), large)  # the seed picks the subset


# ---------------------------------------------------------------- the model
def _config(family: str, **kw) -> ClassifierConfig:
    from framework.models.registry import family as lookup

    preset = {"gpt": "gpt-tiny", "bert": "bert-test"}[family]
    backbone = lookup(family).config_class.from_preset(preset, vocab_size=64).to_dict()
    return ClassifierConfig(backbone=backbone, num_classes=3,
                            special_ids={"eod": 60, "pad": 61, "cls": 62, "sep": 63}, **kw)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_padding_does_not_change_a_documents_logits(family):
    torch.manual_seed(0)
    model = SequenceClassifier(_config(family, pooling="mean" if family == "bert" else "")).eval()
    doc = torch.randint(0, 60, (1, 9))
    alone = model(doc, torch.tensor([9]))
    padded = torch.cat([doc, torch.full((1, 6), 61)], dim=1)
    batch = model(torch.cat([padded, torch.randint(0, 60, (1, 15))]), torch.tensor([9, 15]))
    torch.testing.assert_close(batch[0:1], alone, rtol=1e-5, atol=1e-5)


def test_lora_starts_as_the_base_model_and_merges_into_an_export(tmp_path):
    torch.manual_seed(0)
    lin = LoRALinear(8, 5, True, LoRA(rank=2, alpha=4))
    x = torch.randn(3, 8)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))  # B = 0 at the start
    model = SequenceClassifier(_config("bert", lora_rank=4)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_()  # as after training
    tokens, lengths = torch.randint(0, 60, (2, 12)), torch.tensor([12, 7])
    expected = model(tokens, lengths)
    model.save_pretrained(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "classifier" and config["lora_rank"] == 0
    merged = from_pretrained(tmp_path / "export").eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(tokens, lengths), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- learning
def _bag_of_tokens_baseline(dm) -> float:
    """Val accuracy of a logistic regression on token counts: the plain baseline a classifier must match."""
    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        index = dm._indexes[split]
        docs = dm._units[split]
        x = torch.stack([torch.bincount(torch.from_numpy(index.read(int(d), dm.seq_len - 2)), minlength=dm.vocab_size)
                         for d in docs]).float()
        return x / x.sum(1, keepdim=True), torch.from_numpy(index.label[docs])

    (xt, yt), (xv, yv) = features("train"), features("val")
    torch.manual_seed(0)
    w = torch.zeros(dm.vocab_size, dm.num_classes, requires_grad=True)
    b = torch.zeros(dm.num_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(xt @ w + b, yt).backward()
        opt.step()
    return float(((xv @ w + b).argmax(1) == yv).float().mean())


@pytest.mark.slow  # 150 steps: 7-17 s
def test_the_classifier_learns_as_well_as_a_bag_of_tokens_baseline(labelled):
    import lightning as L

    from framework.data.documents import ClassificationDataModule
    from framework.tasks.classification import ClassificationTask

    L.seed_everything(0, verbose=False)
    dm = ClassificationDataModule(path=str(labelled), seq_len=64, batch_size=16, num_workers=0)
    task = ClassificationTask(backbone="bert", backbone_preset="bert-test", pooling="mean", lr=2e-3, warmup_steps=10,
                              weight_decay=0.01)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=150, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=None, val_check_interval=150)  # validates once, at the end
    trainer.fit(task, datamodule=dm)
    accuracy = float(trainer.callback_metrics["val/accuracy"])
    baseline = _bag_of_tokens_baseline(dm)
    print(f"classifier {accuracy:.3f} bag-of-tokens {baseline:.3f}")
    assert baseline > 0.6  # the task is learnable from the words alone (chance: 1/3)
    assert accuracy >= baseline - 0.1, (accuracy, baseline)
    assert task.val_confusion is not None and int(task.val_confusion.sum()) == 60  # every val document, once


@pytest.mark.parametrize("mode", ["linear", "lora"])
def test_frozen_modes_train_only_the_head_and_adapters_of_a_gpt_backbone(mode, labelled, tmp_path):
    import lightning as L

    from framework.data.documents import ClassificationDataModule
    from framework.models.gpt import GPT, GPTConfig
    from framework.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    GPT(GPTConfig.from_preset("gpt-tiny", vocab_size=261)).save_pretrained(tmp_path / "gpt")
    pretrained = from_pretrained(tmp_path / "gpt").state_dict()
    dm = ClassificationDataModule(path=str(labelled), seq_len=32, batch_size=8, num_workers=0)
    task = ClassificationTask(init_from=str(tmp_path / "gpt"), mode=mode, lr=1e-2, warmup_steps=0)
    start: dict[str, torch.Tensor] = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            start.update({k: v.clone() for k, v in pl_module.model.state_dict().items()})

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Snapshot()])
    trainer.fit(task, datamodule=dm)
    after = task.model.state_dict()
    assert task.model.config.pooling == "last" and task.model.causal
    trained = {n for n in after if not torch.equal(after[n], start[n])}
    expected = {"head.weight", "head.bias"} | {n for n in after if ".lora_" in n}
    assert trained == expected
    assert any(".lora_" in n for n in after) == (mode == "lora")
    for name in after:
        if not name.startswith("head.") and ".lora_" not in name:
            torch.testing.assert_close(start[name], pretrained[name], rtol=0, atol=0, msg=name)  # loaded as is


@pytest.mark.slow
def test_lora_checkpoints_keep_only_what_they_train_and_get_the_rest_from_the_base(labelled, tmp_path):
    """A LoRA fine-tune's checkpoints hold the adapters and the head only; a resume from them continues exactly, and
    an export merges the adapters into the base weights it reads back; a changed or missing base is one line."""
    import os
    import shutil

    from dist_fit import fit, write_config
    from safetensors.torch import load_file
    from test_fit import assert_one_line_error, run_main

    from framework.checkpoint.reader import load_state_dict
    from framework.models.classifier import lora_scale
    from framework.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    GPT(GPTConfig.from_preset("gpt-tiny", vocab_size=261)).save_pretrained(tmp_path / "gpt")
    base = load_file(tmp_path / "gpt" / "model.safetensors")
    args = ("--model.init_args.init_from", str(tmp_path / "gpt"), "--model.init_args.mode", "lora")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run in (straight, resumed):
        run.mkdir()
    common = dict(strategy="ddp", devices=1, max_steps=4, every_n_steps=2, family="classify")
    fit(write_config(straight, labelled, **common), *args)
    fit(write_config(resumed, labelled, stop_at=2, **common), *args)
    fit(write_config(resumed, labelled, label=1, **common), *args, "--ckpt_path", "last")

    last = resumed / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    saved = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert saved and all(k.startswith("head.") or ".lora_" in k for k in saved), sorted(saved)
    assert ckpt["frozen_from"]["path"] == os.path.realpath(tmp_path / "gpt")
    saved_bytes = sum(v.nbytes for v in saved.values())
    base_bytes = sum(v.nbytes for v in base.values())
    assert saved_bytes < 0.2 * base_bytes, (saved_bytes, base_bytes)

    full = load_state_dict(last)  # the checkpoint's tensors with the frozen ones read back from the base
    assert set(full) > set(saved) and all(torch.equal(full[k], base[k]) for k in base if k in full)
    reference = load_state_dict(straight / "run" / "checkpoints" / "last.ckpt")
    assert full.keys() == reference.keys()
    for name in full:  # the resumed fine-tune ends where the uninterrupted one does
        torch.testing.assert_close(full[name], reference[name], rtol=0, atol=0, msg=name)

    r = run_main("export", str(last), str(tmp_path / "exported"))
    assert r.returncode == 0, r.stderr
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    scale = lora_scale(ClassifierConfig.from_dict(ckpt["model_config"]))
    for name, tensor in exported.items():
        adapter = name.removesuffix(".weight")
        expected = full[name]
        if adapter + ".lora_A" in full:
            expected = expected + scale * full[adapter + ".lora_B"] @ full[adapter + ".lora_A"]
        torch.testing.assert_close(tensor, expected, msg=name)
    assert any(adapter.endswith(".lora_A") for adapter in full)

    moved = tmp_path / "moved-gpt"  # a base moved elsewhere: a resume that names it there continues from it
    shutil.copytree(tmp_path / "gpt", moved)
    shutil.rmtree(tmp_path / "gpt")
    fit(write_config(resumed, labelled, label=2, **{**common, "max_steps": 6}), "--model.init_args.init_from",
        str(moved), "--model.init_args.mode", "lora", "--ckpt_path", "last")
    later = torch.load(last, map_location="cpu", weights_only=False)
    assert later["global_step"] == 6 and later["frozen_from"]["path"] == os.path.realpath(moved)

    torch.manual_seed(1)  # another pre-trained model where the base was: the checkpoint must not take it
    GPT(GPTConfig.from_preset("gpt-tiny", vocab_size=261)).save_pretrained(moved)
    assert_one_line_error(run_main("export", str(last), str(tmp_path / "other")), "has changed since")
    shutil.rmtree(moved)
    assert_one_line_error(run_main("export", str(last), str(tmp_path / "other")), "which no longer exists")
    assert not (tmp_path / "other").exists()


def test_data_tokenized_otherwise_than_the_pretrained_model_is_one_line(labelled, tmp_path):
    from test_fit import assert_one_line_error, run_cli

    from framework.data.tokenizer import build_tokenizer
    from framework.models.gpt import GPT, GPTConfig

    GPT(GPTConfig.from_preset("gpt-tiny", vocab_size=320)).save_pretrained(tmp_path / "gpt")
    tok, _ = build_tokenizer("bpe:300", ["alpha beta gamma " * 50])
    (tmp_path / "gpt" / "tokenizer.json").write_text(tok.to_str())
    config = {"model": {"class_path": "framework.tasks.classification.ClassificationTask",
                        "init_args": {"init_from": str(tmp_path / "gpt")}},
              "data": {"class_path": "framework.data.documents.ClassificationDataModule",
                       "init_args": {"path": str(labelled), "seq_len": 32, "batch_size": 4}},
              "trainer": {"accelerator": "cpu", "max_steps": 1, "default_root_dir": str(tmp_path / "run")}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = run_cli("fit", "--config", str(tmp_path / "config.json"), cwd=tmp_path)
    assert_one_line_error(r, "was tokenized with another tokenizer than the model of")


@pytest.mark.slow
def test_a_resumed_fine_tune_continues_exactly_on_another_world_size(labelled, tmp_path):
    """3 steps on 2 ranks, then the rest on 1 rank from `last`: every train document of the epoch is seen exactly
    once, in 2 x 4 + ... batches, and the uninterrupted 1-rank run's document set is the same."""
    from dist_fit import fit, records, write_config

    from framework.models.gpt import GPT, GPTConfig

    GPT(GPTConfig.from_preset("gpt-tiny", vocab_size=261)).save_pretrained(tmp_path / "gpt")
    init = ("--model.init_args.init_from", str(tmp_path / "gpt"))
    run = tmp_path / "resumed"
    run.mkdir()
    fit(write_config(run, labelled, strategy="ddp", devices=2, max_steps=1000, stop_at=3, every_n_steps=3,
                     family="classify"), *init)
    fit(write_config(run, labelled, strategy="ddp", devices=1, max_steps=1000, label=1, family="classify"),
        *init, "--ckpt_path", "last")
    steps = records(run)
    assert [r["step"] for r in steps if r["run"] == 0] == [0, 0, 1, 1, 2, 2]  # 2 ranks x 3 steps
    second = [r["step"] for r in steps if r["run"] == 1]
    assert second[0] == 3 and second == list(range(3, 3 + len(second)))  # the step count continues
    docs = [tuple(row) for r in steps for row in r["windows"]]
    assert len(docs) == len(set(docs))  # no document twice within the epoch
    # 240 train documents: 3 steps x 2 ranks x 4, then the 216 left in batches of 4 on one rank
    assert len(docs) == 240 and len(second) == 54


def test_layer_wise_lr_decay_and_the_heads_own_lr():
    from framework.tasks.classification import ClassificationTask

    task = ClassificationTask(backbone="bert", backbone_preset="bert-test", lr=1e-3, head_lr=1e-2, layer_decay=0.5)
    task.config = _config("bert")  # 2 layers
    scale = task.lr_scale
    assert scale("model.head.weight") == pytest.approx(10.0)
    assert scale("model.transformer.h.1.attn.c_attn.weight") == 0.5 ** 1  # the top block
    assert scale("model.transformer.h.0.mlp.c_fc.bias") == 0.5 ** 2
    assert scale("model.transformer.wte.weight") == 0.5 ** 3  # embeddings: below the first block
    assert scale("model.transformer.ln_f.weight") == 1.0


@pytest.mark.slow
def test_the_transfer_report_compares_both_arms_on_the_same_subsets(labelled, tmp_path):
    from test_fit import run_cli

    from framework.models.gpt import GPT, GPTConfig

    GPT(GPTConfig.from_preset("gpt-tiny", vocab_size=261)).save_pretrained(tmp_path / "gpt")
    r = run_cli("transfer-report", "--pretrained", str(tmp_path / "gpt"), "--data", str(labelled), "--output",
                str(tmp_path / "report"), "--fractions", "0.1,1", "--seeds", "2", "--lrs", "1e-3", "--max-steps", "3",
                "--batch-size", "4", "--seq-len", "32", "--accelerator", "cpu", "--no-classical")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["runs"]) == 2 * 2 * 2  # fractions x arms x seeds
    for fraction in (0.1, 1.0):
        runs = [x for x in report["runs"] if x["fraction"] == fraction]
        assert {x["arm"] for x in runs} == {"pretrained", "scratch"}
        assert len({x["train_docs"] for x in runs}) == 1  # identical subsets for both arms
    assert [row["pretrained"]["train_docs"] for row in report["rows"]] == [24, 240]
    assert all("gain" in row for row in report["rows"]) and report["val_docs"] == 60
    assert (tmp_path / "report" / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| 0.1 | 24 (6) | full |" in table and "| 1 | 240 (48) | full |" in table and "| 0.1 | 24 (6) |" in r.stdout
