"""`pretrain transfer-report`'s budget, early stopping, "nothing learned" rule and classical arm
(framework/commands/transfer_report.py, framework/callbacks/keep_best.py, framework/classical.py, data.holdout)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.commands import transfer_report as tr


def _write_task(path: Path, shuffled: bool) -> None:
    """160 documents of random words, two classes: "early" words use only the letters a-m, "late" ones n-z, so a
    model sees the class in every byte. shuffled=True: the same texts with coin-flip labels (nothing to learn)."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(160):
            label = ("early", "late")[i % 2]
            letters = "abcdefghijklm" if label == "early" else "nopqrstuvwxyz"
            text = " ".join("".join(rng.choice(letters) for _ in range(rng.randrange(3, 8)))
                            for _ in range(rng.randrange(6, 14)))
            if shuffled:
                label = rng.choice(("early", "late"))
            f.write(json.dumps({"text": text, "label": label}) + "\n")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, Path]:
    """{"learnable", "random"}: the two tasks of _write_task, byte-tokenized, val 0.25 (120 train, 40 val docs)."""
    from framework.data.prepare import prepare

    out = {}
    for name in ("learnable", "random"):
        src = tmp_path_factory.mktemp(f"task-{name}")
        _write_task(src / "docs.jsonl", shuffled=name == "random")
        prepare([str(src / "docs.jsonl")], src / "data", val_fraction=0.25, progress=False, labels="label")
        out[name] = src / "data"
    return out


def _args(*extra: str) -> object:
    return tr._parser().parse_args(["--pretrained", "-", "--data", "-", "--output", "-", "--seq-len", "32", *extra])


# ---------------------------------------------------------------- the budget and the rule, without training
def test_the_budget_gives_small_subsets_more_epochs_under_a_step_cap():
    small, large = tr.plan_budget(23, 16, 3, 200, 1000), tr.plan_budget(6400, 16, 3, 200, 1000)
    assert (small.epochs, small.max_steps, small.batch_size) == (200, 200, 16)  # 1 batch per epoch: 200 epochs
    assert (large.epochs, large.max_steps) == (3, 1000)  # 3 epochs would be 1200 steps: the cap
    assert tr.plan_budget(2297, 16, 3, 200, 1000).max_steps == 3 * 143  # 3 full epochs fit under the cap
    assert tr.plan_budget(5, 16, 3, 0, 1000).batch_size == 5  # a subset smaller than a batch: one batch per epoch
    assert small.eval_every == 20 and large.eval_every == 100  # about 10 held-out scores per run


def test_the_held_out_slice_is_stratified_and_outside_training(labelled):
    from framework.data.documents import ClassificationDataModule
    from framework.data.samples import holdout_split, stratified_subset

    labels = np.array([0] * 10 + [1] * 5 + [2])
    fit, held = holdout_split(labels, np.arange(16), 0.2, seed=3)
    assert sorted(np.bincount(labels[held], minlength=3)) == [0, 1, 2]  # 2 of 10, 1 of 5, never a class's last
    assert not set(fit) & set(held) and len(fit) + len(held) == 16

    dm = ClassificationDataModule(path=str(labelled), batch_size=4, seed=1, label_fraction=0.5, holdout=0.2,
                                  num_workers=0)
    dm.setup("fit")
    subset = stratified_subset(dm._indexes["train"].label, 0.5, 1)
    trained = {int(b) for batch in dm.train_dataloader() for b in batch["sample_ids"]}
    scored = {int(b) for batch in dm.val_dataloader() for b in batch["sample_ids"] if b >= 0}
    assert trained.isdisjoint(scored) and trained | scored <= set(subset.tolist())
    assert len(scored) == len(dm.val_labels()) == round(0.2 * len(subset))
    plain = ClassificationDataModule(path=str(labelled), batch_size=4, seed=1, label_fraction=0.5, num_workers=0)
    plain.setup("fit")
    assert len(plain.val_labels()) == 60  # without holdout: the val split


def _runs(accuracy: dict[str, float], fraction: float = 1.0) -> list[tr.Run]:
    return [tr.Run(fraction, "full", arm, 1e-3, seed, acc + 0.01 * seed, acc, 100, 1.0, acc + 0.01 * seed,
                   held_docs=20, epochs=3, max_steps=30, batch_size=8, steps=20 + seed, best_step=10)
            for arm, acc in accuracy.items() for seed in range(2)]


def test_a_report_at_chance_says_nothing_was_learned_instead_of_a_gain():
    bar = tr.learned_bar(0.5, 100)
    assert bar == pytest.approx(0.6)  # 0.5 + 2 * sqrt(0.25 / 100)
    learning = _runs({"pretrained": 0.8, "scratch": 0.7}, 0.1)
    learning[0].capped = True  # stopped by the cap while its held-out score was still rising
    rows = tr.summarize(_runs({"pretrained": 0.55, "scratch": 0.52}) + learning, bar=bar)
    header = {"data": "d", "pretrained": "p", "seeds": 2, "lrs": [1e-3], "batch_size": 8, "shape": "s",
              "val_docs": 100, "unit": "docs", "classes": 2, "majority": 0.5, "epochs": 3, "min_steps": 20,
              "max_steps": 30, "holdout": 0.2, "patience": 3, "evals": 10, "learned_bar": bar, "classical": ""}
    table = tr.markdown(rows, header)
    learned, chance = (next(line for line in table.splitlines() if line.startswith(f"| {f} |")) for f in ("0.1", "1"))
    assert chance.endswith(f"| {tr.NOTHING_LEARNED} |") and "+3.0 pts" not in chance
    assert learned.endswith("| +10.0 pts |") and "| 3 epochs ≤ 30 steps of 8 |" in learned
    assert "(lr 0.001, 20–21 steps, 1 of 2 still improving at the cap)" in learned and "| 100 (20) |" in learned
    assert "(lr 0.001, 20–21 steps) |" in chance


# ---------------------------------------------------------------- the classical arm
def test_tfidf_and_the_logistic_regression_match_their_definitions():
    from framework.classical import NgramTfidf, fit_logistic

    tfidf = NgramTfidf("word", (1, 2)).fit(["a b a", "b c"])
    X = tfidf.transform(["a b a", "zz"]).to_dense()
    # df: a 1, b 2, "a b" 1, "b a" 1, ...; n = 2 -> idf = log(3 / (1 + df)) + 1; tf(a) = 2 -> 1 + log 2
    idf = {g: math.log(3 / (1 + df)) + 1 for g, df in (("a", 1), ("b", 2), ("a b", 1), ("b a", 1))}
    raw = {"a": (1 + math.log(2)) * idf["a"], "b": idf["b"], "a b": idf["a b"], "b a": idf["b a"]}
    norm = math.sqrt(sum(v * v for v in raw.values()))
    for g, v in raw.items():
        assert float(X[0, tfidf.vocab[g]]) == pytest.approx(v / norm, rel=1e-5)
    assert float(X[1].abs().sum()) == 0  # nothing known: a zero row

    # at the optimum of mean CE + ||W||^2 / (2 C n) the gradient, written out by hand, vanishes
    g = torch.Generator().manual_seed(0)
    Xd, y = torch.randn(40, 5, generator=g), np.arange(40) % 3
    model = fit_logistic(Xd, y, 3, C=0.5)
    P = torch.softmax(Xd @ model.W + model.b, -1).double()
    Y = torch.nn.functional.one_hot(torch.as_tensor(y), 3).double()
    grad_W = Xd.double().T @ (P - Y) / 40 + model.W.double() / (0.5 * 40)
    assert float(grad_W.abs().max()) < 1e-4 and float((P - Y).mean(0).abs().max()) < 1e-4


def test_the_fingerprint_arm_fits_ridge_and_logistic_per_target_on_present_values():
    """Molecule graphs' classical arm: each target's model sees only the molecules where it is present; ridge's
    normal equations hold (dual and primal solve alike), and a classification task is its own logistic regression."""
    pytest.importorskip("rdkit")
    from framework.classical import fingerprints, fit_logistic, fit_per_target, select_per_target, target_score

    X = fingerprints(["CCO", "c1ccccc1O", "not a molecule", ""], bits=256)
    assert X.shape == (4, 256) and bool((X == X.round()).all()) and X.min() == 0  # counts
    # ethanol: 3 atoms x radius 0 and 1; each radius-2 environment is the whole molecule again, counted once
    assert X[0].sum() == 6 and X[1].sum() > X[0].sum() and X[2:].abs().sum() == 0  # unreadable: zero rows

    g = torch.Generator().manual_seed(0)
    for n in (30, 90):  # fewer rows than features (the dual solve), more (the primal one)
        Xr = (torch.rand(n, 60, generator=g) < 0.3).float()
        Y = (Xr @ torch.randn(60, 2, generator=g)).double().numpy() + 5.0
        Y[::3, 1] = np.nan  # missing values of target 1
        model = fit_per_target(Xr, Y, "regression", strength=2.0)
        for t in range(2):
            present = ~np.isnan(Y[:, t])
            x, y = Xr[present].double(), torch.from_numpy(Y[present, t])
            residual = y - (x @ model.W[:, t].double() + float(model.b[t]))
            assert float(residual.sum().abs()) < 1e-3  # the bias: unpenalized
            grad = -x.T @ residual + 2.0 * model.W[:, t].double()  # d/dw of ||r||^2 / 2 + alpha ||w||^2 / 2
            assert float(grad.abs().max()) < 1e-3, (n, t)
    held = select_per_target(Xr[:60], Y[:60], Xr[60:], Y[60:], "regression")
    assert held.strength in (0.1, 1.0, 10.0, 100.0)
    assert target_score(held, Xr[60:], Y[60:], "regression") < float(np.sqrt(np.nanmean((Y[60:] - np.nanmean(
        Y[:60], 0)) ** 2)))  # better than the train mean on data a linear model can fit

    labels = np.stack([(Y[:, 0] > np.median(Y[:, 0])), np.ones(len(Y))], 1).astype(np.float64)
    labels[:5, 0] = np.nan
    model = fit_per_target(Xr, labels, "classification", strength=1.0)
    alone = fit_logistic(Xr[5:], labels[5:, 0].astype(np.int64), 2, 1.0)
    assert torch.allclose(model.W[:, 0], alone.W[:, 1] - alone.W[:, 0], atol=1e-5)
    assert float(model.b[1]) > 0 and float(model.W[:, 1].abs().sum()) == 0  # one class only: its side, no slope
    assert target_score(model, Xr, labels, "classification") > 0.9  # task 1 has one class: not in the mean


def test_the_classical_arm_learns_what_is_there_and_nothing_else(tasks):
    bar = tr.learned_bar(0.5, 40)
    learnable = tr.classical_one(str(tasks["learnable"]), 1.0, 0, _args())
    shuffled = tr.classical_one(str(tasks["random"]), 1.0, 0, _args())
    assert learnable is not None and shuffled is not None
    assert learnable.accuracy > bar and (learnable.train_docs, learnable.held_docs) == (120, 24)
    assert shuffled.accuracy < bar, f"random labels, yet the classical arm scores {shuffled.accuracy:.1%}"


# ---------------------------------------------------------------- the whole report
@pytest.mark.slow
def test_the_report_states_its_budget_and_whether_anything_was_learned(tasks, gpt_checkpoint, tmp_path):
    """A task the model learns in a few steps gets a gain beside its budget (and the optional adapted arm is run and
    reported); random labels get "nothing was learned" (every arm trained with the same budget, early-stopped on
    its held-out slice)."""
    from test_fit import run_main

    common = ("--pretrained", str(gpt_checkpoint), "--fractions", "1", "--seeds", "1", "--lrs", "3e-3",
              "--batch-size", "8", "--seq-len", "32", "--pooling", "mean", "--accelerator", "cpu")
    r = run_main("transfer-report", *common, "--data", str(tasks["learnable"]), "--output", str(tmp_path / "a"),
                 "--max-steps", "24", "--min-steps", "0", "--adapt-steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    row = report["rows"][0]
    assert row["learned"] and row["budget"] == {"epochs": 3, "max_steps": 24, "batch_size": 8}, row
    assert max(row[a]["score_mean"] for a in tr.ARMS) > report["learned_bar"] > 0.5
    assert row["classical"]["score_mean"] > report["learned_bar"]
    assert {run["arm"] for run in report["runs"]} == {"pretrained", "scratch", "adapted", "classical"}
    # the adapted arm: 4 more next-token steps on the train split's texts, then fine-tuned from that export
    assert report["adapt"]["steps"] == 4 and math.isfinite(report["adapt"]["last_train_loss"])
    assert (tmp_path / "a" / "adapted" / "tokenizer.json").exists() and "vs_pretrained" in row["adapted"]
    assert "continued pre-training: next-token prediction, 4 steps of 8 windows of 32 tokens" in r.stdout
    assert all(run["held_docs"] == 24 and run["train_docs"] == 120 for run in report["runs"])
    assert all(run["best_step"] <= run["steps"] <= 24 for run in report["runs"] if run["arm"] != "classical")
    line = next(x for x in r.stdout.splitlines() if x.startswith("| 1 | 120 (24) | full |"))
    assert "| 3 epochs ≤ 24 steps of 8 |" in line and line.endswith(" pts |") and tr.NOTHING_LEARNED not in line
    assert "budget 3 epochs <= 24 steps of 8, ran" in r.stdout
    assert (tmp_path / "a" / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = run_main("transfer-report", *common, "--data", str(tasks["random"]), "--output", str(tmp_path / "b"),
                 "--max-steps", "6", "--min-steps", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((tmp_path / "b" / "report.json").read_text())["rows"][0]
    assert row["learned"] is False and row["classical"]["score_mean"] < tr.learned_bar(0.5, 40)
    assert f"| {tr.NOTHING_LEARNED} |" in (tmp_path / "b" / "report.md").read_text()


def test_a_fine_tuning_run_that_fits_its_subset_is_not_stopped_as_a_loss_spike():
    from framework.callbacks.guard import GuardOptions, SpikeDetector

    # a fine-tuning loss that has reached ~0.005, then three harder batches: the pre-training rule calls it a spike
    losses = [0.005 * (1 + 0.1 * (i % 3)) for i in range(150)] + [0.3, 0.4, 0.3]
    o = GuardOptions()
    default = SpikeDetector(o.spike_window, o.spike_sigmas, o.spike_patience, o.spike_warmup)
    assert any(default.update(step, loss) for step, loss in enumerate(losses))
    guard = tr.run_guard()
    assert guard.options.spike_window == 0 and guard.options.skip_nonfinite
