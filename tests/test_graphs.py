"""Molecule graphs: `pretrain prepare-molecules` (featurization, inputs, labels, splits, bad input), the graph reader
(disjoint-union batches, exactly-once, seeded masks), the GIN, the graph losses, attribute-masking pre-training (exact
resume; a learning check against the most-frequent-atom baseline), property fine-tuning from a pre-trained checkpoint,
and both under DDP, FSDP2 and ZeRO-2 on 2 processes."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from framework.commands.fit import fit
from framework.data.graphs import GraphDataModule, GraphStream
from framework.data.molecules import ATOM_VALUES, featurize, prepare_molecules, scaffold_of
from framework.data.writer import verify
from framework.errors import UserError
from framework.models.gin import GIN, GINConfig
from framework.objectives.graph import masked_bce, masked_mse, mean_roc_auc, roc_auc
from test_fit import assert_one_line_error, run_main

pytest.importorskip("rdkit")

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "C1CCCCC1N", "O=C(O)c1ccccc1C(=O)O", "CCN(CC)CC",
          "c1ccc2ccccc2c1", "C[C@H](N)C(=O)O", "ClC(Cl)Cl", "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "C/C=C/C", "[Na+].[Cl-]"]


def csv_file(path: Path, rows: list[str], header: str = "smiles,tox_a,tox_b") -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def nci(_shared) -> Path:
    """RDKit's embedded NCI molecules, unlabelled, random split (made once per run; read only)."""
    def build(factory) -> Path:
        out = factory.mktemp("nci") / "data"
        prepare_molecules(None, out, embedded="nci", progress=False)
        return out
    return _shared.get(("graphs", "nci"), build)


@pytest.fixture(scope="module")
def tpsa(_shared) -> Path:
    """The same molecules with their TPSA (regression), scaffold split."""
    def build(factory) -> Path:
        out = factory.mktemp("tpsa") / "data"
        prepare_molecules(None, out, embedded="nci-tpsa", split="scaffold", progress=False)
        return out
    return _shared.get(("graphs", "tpsa"), build)


# ---------------------------------------------------------------------------------------------------- prepare
def test_featurize_follows_the_molecule():
    from rdkit import Chem

    atoms, bonds, bond_features = featurize(Chem.MolFromSmiles("C[C@H](N)c1ccccc1"))
    assert atoms.shape == (9, 7) and bonds.shape == (9, 2) and bond_features.shape == (9, 3)
    assert atoms[:, 0].tolist()[:3] == [5, 5, 6]  # C, C, N: atomic number - 1
    assert atoms[1, 1] in (1, 2)  # the stereo centre is chiral
    assert atoms[0, 4] == 3 and atoms[2, 4] == 2  # CH3, NH2
    assert atoms[3:, 6].tolist() == [1] * 6 and atoms[:3, 6].tolist() == [0] * 3  # aromaticity
    assert ATOM_VALUES["hybridization"][atoms[0, 5]] == "SP3" and ATOM_VALUES["hybridization"][atoms[3, 5]] == "SP2"
    assert sorted(bond_features[:, 0].tolist()) == [0, 0, 0] + [3] * 6  # 3 single, 6 aromatic bonds
    assert scaffold_of("CCc1ccccc1") == "c1ccccc1" and scaffold_of("CCO") == ""


def test_prepare_labels_invalid_molecules_determinism_and_verify(tmp_path):
    rows = [f"{s},{i % 2},{'' if i % 3 == 0 else (i + 1) % 2}" for i, s in enumerate(SMILES)]
    rows.insert(3, "not_a_smiles,1,0")
    src = csv_file(tmp_path / "tox.csv", rows)
    manifests = []
    for name in ("a", "b"):
        manifests.append(prepare_molecules([str(src)], tmp_path / name, label_columns=["tox_a", "tox_b"],
                                           val_fraction=0.25, progress=False))
    a = manifests[0]
    assert a == manifests[1] and verify(tmp_path / "a") == []  # a pure function of the inputs
    assert a["modality"] == "graphs" and a["invalid"]["count"] == 1
    assert a["invalid"]["examples"][0] == {"source": "tox.csv", "line": 5, "input": "not_a_smiles",
                                           "reason": "RDKit cannot parse it"}
    assert a["splits"]["train"]["samples"] + a["splits"]["val"]["samples"] == len(SMILES)
    targets = a["targets"]
    assert targets["names"] == ["tox_a", "tox_b"] and targets["task"] == "classification"
    assert sum(targets["counts"]["train"]) + sum(targets["counts"]["val"]) == len(SMILES) * 2 - 4  # 4 missing
    dm = GraphDataModule(path=str(tmp_path / "a"), batch_size=2)
    dm.setup("fit")
    y = np.concatenate([dm._indexes[s].y for s in ("train", "val")])
    assert y.shape == (12, 2) and np.isnan(y).sum() == 4
    with pytest.raises(UserError, match="line 5 .*not_a_smiles.*drop --strict"):
        prepare_molecules([str(src)], tmp_path / "c", label_columns=["tox_a"], strict=True, progress=False)
    assert not (tmp_path / "c").exists()  # nothing half-written


def test_prepare_reads_smiles_sdf_and_gzip(tmp_path):
    from rdkit import Chem

    (tmp_path / "mols.smi").write_text("smiles name\n" + "\n".join(f"{s} m{i}" for i, s in enumerate(SMILES)))
    with gzip.open(tmp_path / "mols.smi.gz", "wt") as f:
        f.write("\n".join(SMILES) + "\n")
    writer = Chem.SDWriter(str(tmp_path / "mols.sdf"))
    for i, s in enumerate(SMILES[:6]):
        mol = Chem.MolFromSmiles(s)
        mol.SetProp("logS", str(-i * 0.5))
        writer.write(mol)
    writer.close()
    plain = prepare_molecules([str(tmp_path / "mols.smi")], tmp_path / "plain", progress=False)
    zipped = prepare_molecules([str(tmp_path / "mols.smi.gz")], tmp_path / "zipped", progress=False)
    for split in ("train", "val"):  # the same molecules (keys differ: they name the file and line)
        assert plain["splits"][split]["samples"] == zipped["splits"][split]["samples"]
        assert plain["splits"][split]["tokens"] == zipped["splits"][split]["tokens"]
    sdf = prepare_molecules([str(tmp_path / "mols.sdf")], tmp_path / "sdf", label_columns=["logS"],
                            progress=False, val_fraction=0.0)
    assert sdf["targets"]["task"] == "regression" and sdf["splits"]["train"]["samples"] == 6
    assert math.isclose(sdf["targets"]["mean"][0], -1.25)


def test_scaffold_split_keeps_scaffolds_apart(tpsa):
    manifest = json.loads((tpsa / "manifest.json").read_text())
    assert manifest["split"]["kind"] == "scaffold" and manifest["targets"]["names"] == ["tpsa"]
    dm = GraphDataModule(path=str(tpsa), batch_size=8)
    dm.setup("fit")
    scaffolds = {s: {scaffold_of(smi) for smi in dm._indexes[s].smiles} for s in ("train", "val")}
    assert not scaffolds["train"] & scaffolds["val"]  # no val molecule shares a scaffold with a train one
    n_val = len(dm._indexes["val"])
    assert 0.08 < n_val / (n_val + len(dm._indexes["train"])) < 0.12


@pytest.mark.parametrize("case,fragment", [
    ("no-column", "has no column 'smiles' (its columns: name, value); pass --smiles-column"),
    ("empty", "holds no molecules"),
    ("all-invalid", "none of the 2 molecules"),
    ("text-label", "label column 'value' holds text 'toxic' at in.csv line 3"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case, fragment):
    src = tmp_path / "in.csv"
    args = ["--label-column", "value"]
    if case == "no-column":
        csv_file(src, ["CCO,1"], header="name,value")
    elif case == "empty":
        src.write_text("")
        args = []
    elif case == "all-invalid":
        csv_file(src, ["xx,1", "C1CC,0"], header="smiles,value")
    else:
        csv_file(src, ["CCO,1", "CCN,toxic"], header="smiles,value")
    r = run_main("prepare-molecules", "--input", str(src), "--output", str(tmp_path / "out"), *args)
    assert_one_line_error(r, fragment)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- reader
def test_batches_are_disjoint_unions_delivered_exactly_once_with_seeded_masks(nci):
    dm = GraphDataModule(path=str(nci), batch_size=16, mask_rate=0.15, num_workers=0)
    dm.setup("fit")
    index, units = dm._indexes["train"], dm._units["train"]
    streams = [GraphStream(index, units, batch_size=16, rank=r, world=2, seed=5, mask_rate=0.15,
                           atom_mask=[v - 1 for v in dm.model_fields()["atom_vocab"]],
                           bond_mask=[v - 1 for v in dm.model_fields()["bond_vocab"]]) for r in (0, 1)]
    seen = []
    for stream in streams:
        for batch in stream:
            seen += batch["sample_ids"].tolist()
    assert len(seen) == len(set(seen)) and len(seen) >= len(units) - 2 * 16  # once each (a last partial is dropped)
    batch = next(iter(streams[0]))
    ids = batch["sample_ids"].tolist()
    atoms = [int(index.atom_ptr[i + 1] - index.atom_ptr[i]) for i in ids]
    assert batch["x"].shape == (sum(atoms), 7) and batch["batch"].tolist() == sum(([g] * n for g, n in
                                                                                   enumerate(atoms)), [])
    src, dst = batch["edge_index"]
    assert (batch["batch"][src] == batch["batch"][dst]).all()  # no edge between two molecules
    assert batch["edge_index"].shape[1] == 2 * sum(int(index.bond_ptr[i + 1] - index.bond_ptr[i]) for i in ids)
    # the masked atoms carry every feature's mask index, and their original types are the targets
    masked = batch["x"][batch["atom_index"]]
    assert (masked == torch.tensor([v - 1 for v in dm.model_fields()["atom_vocab"]])).all()
    first = index.atoms[index.atom_ptr[ids[0]]:index.atom_ptr[ids[0] + 1], 0]
    in_first = batch["atom_index"][batch["atom_index"] < atoms[0]]
    assert batch["atom_targets"][:len(in_first)].tolist() == first[in_first.numpy()].tolist()
    # a molecule's masks depend on (seed, epoch, sample) alone, not on the batch it lands in
    alone = streams[0]._batch(np.array([ids[3]]), epoch=0)
    start = sum(atoms[:3])
    mine = batch["atom_index"][(batch["atom_index"] >= start) & (batch["atom_index"] < start + atoms[3])] - start
    assert alone["atom_index"].tolist() == mine.tolist()
    assert streams[0]._batch(np.array([ids[3]]), epoch=1)["atom_index"].tolist() != mine.tolist() or atoms[3] < 4


# ---------------------------------------------------------------------------------------------------- model, losses
def test_gin_sees_graphs_not_atom_orders_or_batch_mates():
    torch.manual_seed(0)
    model = GIN(GINConfig.from_preset("gin-test", num_tasks=2, pooling="sum")).eval()
    x = torch.tensor([[5, 0, 2, 5, 3, 3, 0], [7, 0, 1, 5, 1, 3, 0], [6, 0, 1, 5, 2, 3, 0]])  # C-O, C-N
    edges = torch.tensor([[0, 1, 0, 2], [1, 0, 2, 0]])
    attr = torch.tensor([[0, 0, 0]] * 4)
    one = model(x, edges, attr, torch.zeros(3, dtype=torch.long), 1)["logits"]
    perm = torch.tensor([2, 0, 1])  # new atom i is old atom perm[i]
    inverse = torch.argsort(perm)
    permuted = model(x[perm], inverse[edges], attr, torch.zeros(3, dtype=torch.long), 1)["logits"]
    assert torch.allclose(one, permuted, atol=1e-5)
    other = torch.tensor([[16, 0, 0, 5, 2, 3, 0]])  # a lone sulfur, batched with the first molecule
    both = model(torch.cat([x, other]), edges, attr, torch.tensor([0, 0, 0, 1]), 2)["logits"]
    assert torch.allclose(both[0], one[0], atol=1e-5)
    assert GINConfig.from_preset("gin-hu").hidden == 300 and GINConfig.from_preset("gin-hu").num_layers == 5


def test_graph_losses_match_naive_references():
    rng = np.random.default_rng(0)
    scores, labels = rng.random(50).round(1), rng.random(50) < 0.4  # rounded: ties
    # ROC-AUC by its definition: the chance that a positive outscores a negative, ties counting one half
    pairs = [(p, n) for p in scores[labels] for n in scores[~labels]]
    by_pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert math.isclose(roc_auc(scores, labels), by_pairs)
    y = np.array([[1, np.nan], [0, 1], [1, 0], [0, np.nan]])
    s = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.5]])
    assert mean_roc_auc(s, y) == 1.0
    logits, yt = torch.tensor(s), torch.tensor(y)
    loss, count = masked_bce(logits, yt)
    present = ~np.isnan(y)
    p = 1 / (1 + np.exp(-s))
    naive = -(y * np.log(p) + (1 - y) * np.log(1 - p))[present].mean()
    assert count == 6 and math.isclose(float(loss), naive, rel_tol=1e-6)
    mse, count = masked_mse(logits, yt)
    assert math.isclose(float(mse), ((s - y)[present] ** 2).mean(), rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------------- fit
def write_config(tmp: Path, data: Path, task: str = "framework.tasks.graph.AttributeMaskingTask", steps: int = 8,
                 model: dict | None = None, data_args: dict | None = None, **trainer) -> Path:
    config = {
        "seed_everything": 3,
        "model": {"class_path": task, "init_args": {"lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.0,
                                                    **(model or {"preset": "gin-test"})}},
        "data": {"class_path": "framework.data.graphs.GraphDataModule",
                 "init_args": {"path": str(data), "batch_size": 16, "num_workers": 1, **(
                     {"mask_rate": 0.15} if data_args is None else data_args)}},
        "trainer": {"default_root_dir": str(tmp / "run"), "accelerator": "cpu", "devices": 1, "max_steps": steps,
                    "log_every_n_steps": 1, "enable_progress_bar": False, "val_check_interval": 4,
                    "limit_val_batches": 2, "check_val_every_n_epoch": None,
                    "callbacks": [{"class_path": "recorder.StepRecorder",
                                   "init_args": {"path": str(tmp / "steps.jsonl")}}], **trainer},
        "checkpoint": {"every_n_steps": 4, "keep": 2},
        "wandb": {"mode": "disabled"},
    }
    (tmp / "config.json").write_text(json.dumps(config))
    return tmp / "config.json"


def steps(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(nci, tmp_path_factory) -> Path:
    """A 8-step attribute-masking fit of gin-test (its last.ckpt)."""
    tmp = tmp_path_factory.mktemp("masking")
    fit(["--config", str(write_config(tmp, nci))])
    return tmp


def assert_resumes_exactly(config: Path, straight_run: Path, tmp_path: Path) -> dict:
    """An 8-step fit stopped at step 4 and resumed from `last` replays the straight run (`straight_run`, the same
    config) molecule for molecule, loss for loss, and ends with the same weights; returns the straight checkpoint."""
    fit(["--config", str(config), "--trainer.callbacks.init_args.stop_at", "4"])
    fit(["--config", str(config), "--ckpt_path", "last"])
    straight, resumed = steps(straight_run), steps(tmp_path)
    assert [s["step"] for s in resumed] == list(range(8))
    assert [s["sample_ids"] for s in resumed] == [s["sample_ids"] for s in straight]  # same molecules, in order
    assert [s["loss"] for s in resumed] == [s["loss"] for s in straight]  # same masks/views, dropout, optimizer
    a = torch.load(straight_run / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    return a


def test_attribute_masking_resumes_exactly(nci, pretrained, tmp_path):
    a = assert_resumes_exactly(write_config(tmp_path, nci), pretrained, tmp_path)
    assert a["model_config"]["model_type"] == "gin" and a["model_config"]["masking_head"]
    # `pretrain export` writes the family's files; the registry builds the GIN back from them alone
    from framework.models.registry import from_pretrained

    exported = run_main("export", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "export"))
    assert exported.returncode == 0, exported.stderr
    model = from_pretrained(tmp_path / "export")
    assert isinstance(model, GIN) and model.config.masking_head
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, a["state_dict"]["model." + name]), name  # = the resumed run's (asserted above)


def test_fine_tuning_starts_from_the_pre_trained_layers_with_a_new_head(tpsa, pretrained, tmp_path, capsys):
    ckpt = pretrained / "run" / "checkpoints" / "last.ckpt"
    fit(["--config", str(write_config(tmp_path, tpsa, task="framework.tasks.graph.PropertyTask", steps=4,
                                      model={"init_from": str(ckpt)}, data_args={}))])
    out = capsys.readouterr().out
    assert "new (fresh init): head.bias, head.weight" in out and "atom_head" in out  # dropped: the masking heads
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    config = saved["model_config"]
    assert config["num_tasks"] == 1 and not config["masking_head"] and config["hidden"] == 16
    train_y = np.concatenate([json.loads((tpsa / "manifest.json").read_text())["targets"]["mean"]])
    assert math.isclose(config["target_mean"][0], train_y[0], rel_tol=1e-5)  # the scaler travels with the weights
    (tmp_path / "unmasked").mkdir()
    config = write_config(tmp_path / "unmasked", tpsa, data_args={})  # masking needs masked batches
    assert_one_line_error(run_main("fit", "--config", str(config)), "set data.mask_rate (Hu et al.: 0.15)")


# ---------------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_masked_atom_accuracy_is_far_above_the_most_frequent_atom(nci, tmp_path, capsys):
    """Attribute masking (atoms and their bonds masked) of a small GIN for 200 steps: the masked atoms' types are
    predicted far better than by always guessing the most frequent atom (carbon), and the loss is far below the
    train split's type priors', both measured on the same val molecules."""
    fit(["--config", str(write_config(tmp_path, nci, steps=200, model={"preset": "gin-test",
                                                                       "config": {"hidden": 64, "num_layers": 3}},
                                      data_args={"mask_rate": 0.15, "batch_size": 32}, val_check_interval=200,
                                      limit_val_batches=None))])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("val/accuracy:"))
    accuracy, baseline = (float(v.rstrip("%")) / 100 for v in (line.split()[1], line.split()[-1]))
    assert 0.6 < baseline < 0.85  # carbon's share of the val atoms
    # a quarter of the most-frequent guess's errors gone (a 400-step gin-cpu run removes ~40%, README)
    assert accuracy > baseline + 0.25 * (1 - baseline), (accuracy, baseline)
    loss_line = next(line for line in out.splitlines() if line.startswith("val/loss:"))
    loss, prior = float(loss_line.split()[1]), float(loss_line.split("baseline:")[1].split()[0])
    assert loss < 0.6 * prior, (loss, prior)


# ---------------------------------------------------------------------------------------------------- strategies
@pytest.mark.slow
@pytest.mark.parametrize("pre,fine", [("fsdp", "ddp")])  # ZeRO wraps a GIN as any model (tests/test_strategies.py)
def test_graph_tasks_train_on_two_processes(nci, tpsa, tmp_path, pre, fine):
    """Attribute masking for 3 steps on 2 ranks under FSDP2 (its checkpoint a sharded directory) and ZeRO-2;
    fine-tuning under DDP from the FSDP2 checkpoint, each rank on its own molecules."""
    from dist_fit import cli

    (tmp_path / "pre").mkdir()
    common = dict(steps=3, devices=2, val_check_interval=3)
    r = cli("fit", "--config", str(write_config(tmp_path / "pre", nci, strategy=pre, **common)), cwd=tmp_path / "pre")
    assert r.returncode == 0, r.stderr[-4000:]
    ckpt = tmp_path / "pre" / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.exists() and "val/accuracy" in r.stdout
    if fine is None:
        return
    (tmp_path / "fine").mkdir()
    config = write_config(tmp_path / "fine", tpsa, task="framework.tasks.graph.PropertyTask", strategy=fine,
                          model={"init_from": str(ckpt)}, data_args={}, **common)
    r = cli("fit", "--config", str(config), cwd=tmp_path / "fine")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "loaded" in r.stdout and "new (fresh init): head.bias, head.weight\n" in r.stdout, r.stdout
    assert "val RMSE" in r.stdout, r.stdout
    batches = {json.loads(line)["sample_ids"] for line in (tmp_path / "fine" / "steps.jsonl").read_text().splitlines()}
    assert len(batches) == 6  # 3 steps x 2 ranks, every batch a different set of molecules


@pytest.mark.slow
def test_the_transfer_report_compares_rmse_of_both_arms_on_graphs(tpsa, pretrained, tmp_path):
    ckpt = pretrained / "run" / "checkpoints" / "last.ckpt"
    r = run_main("transfer-report", "--pretrained", str(ckpt), "--data", str(tpsa), "--output",
                 str(tmp_path / "report"), "--fractions", "0.1,1", "--seeds", "1", "--lrs", "1e-3", "--max-steps", "3",
                 "--batch-size", "32", "--pooling", "sum", "--accelerator", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["metric"] == "RMSE" and report["lower_is_better"] and report["unit"] == "molecules"
    assert len(report["runs"]) == 2 * 2 + 2 and all(run["score"] > 0 for run in report["runs"])
    for row in report["rows"]:  # positive gain = pre-training lowered the RMSE; negative = it hurt
        assert math.isclose(row["gain"], row["scratch"]["score_mean"] - row["pretrained"]["score_mean"])
        assert row["pretrained"]["train_docs"] == row["scratch"]["train_docs"] == row["classical"]["train_docs"]
    table = (tmp_path / "report" / "report.md").read_text()
    assert "val RMSE" in table and "Lower is better" in table and "the train mean scores RMSE" in table
    assert "Morgan count fingerprints" in table and "(alpha " in table


def test_the_fingerprint_arm_predicts_tpsa_far_better_than_the_train_mean(tpsa):
    """TPSA is a sum of polar fragments' contributions: fingerprints + ridge should get most of it, on the neural
    arms' subset, held-out slice and scaffold val split."""
    from framework.commands import transfer_report as tr

    args = tr._parser().parse_args(["--pretrained", "-", "--data", str(tpsa), "--output", "-"])
    run = tr.classical_one(str(tpsa), 0.5, 0, args)
    dm = tr.datamodule(str(tpsa), args, label_fraction=0.5)
    dm.setup("fit")
    header = tr.graph_header(dm, args)
    mean_rmse = float(header["about"].split("RMSE ")[1])
    assert run.arm == "classical" and run.held_docs > 0 and run.lr in (0.1, 1.0, 10.0, 100.0)
    assert run.score < 0.5 * mean_rmse, f"fingerprints + ridge RMSE {run.score:.3g} vs the train mean's {mean_rmse:.3g}"
