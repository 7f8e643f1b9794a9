"""The shard writer as a new modality would use it (public names only), and the manifest's `modality` field:
written by every prepare, inferred for manifests of earlier versions, checked by the datamodules in one line."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from framework.data.datamodule import ShardDataModule
from framework.data.images import ImageDataModule
from framework.data.manifest import MANIFEST, check_modality, header, modality_of, split_entry
from framework.data.prepare import prepare
from framework.data.prepare_images import prepare_images
from framework.data.writer import make_key, output_transaction, verify
from framework.errors import UserError


def prepare_toy(out: Path, molecules: list[str], overwrite: bool = False, fail_at: int | None = None) -> dict:
    """A toy modality's whole prepare: SMILES strings, every fifth to val."""
    with output_transaction(out, overwrite) as output:
        if overwrite:
            output.remove_previous()
        writers = {s: output.writer(s, max_bytes=16) for s in ("train", "val")}
        for i, smiles in enumerate(molecules):
            if i == fail_at:
                raise ValueError("bad molecule")
            split = "val" if i % 5 == 4 else "train"
            writers[split].write(make_key(i, f"mol/{smiles}", 0), {"smi": smiles.encode(), "cls": b"0"})
        return output.commit({**header("molecules"),
                              "splits": {s: split_entry(w.finish()) for s, w in writers.items()}})


def test_a_new_modality_writes_verified_deterministic_shards_with_the_public_api(tmp_path):
    mols = ["CCO", "c1ccccc1", "CC(=O)O", "N#N", "O=C=O", "CCN", "C1CC1"]
    manifest = prepare_toy(tmp_path / "a", mols)
    assert modality_of(manifest) == "molecules" and manifest["splits"]["val"]["samples"] == 1
    assert json.loads((tmp_path / "a" / MANIFEST).read_text()) == manifest
    assert verify(tmp_path / "a") == []  # no tokenizer: nothing to check there
    shard = tmp_path / "a" / manifest["splits"]["train"]["shards"][0]["name"]
    with tarfile.open(shard) as tf:
        assert tf.getnames()[:2] == ["000000000_mol_CCO.smi", "000000000_mol_CCO.cls"]
    prepare_toy(tmp_path / "b", mols)
    for p in (tmp_path / "a").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()
    shard.write_bytes(shard.read_bytes()[:-1])
    assert verify(tmp_path / "a") == [f"{shard.name} has {shard.stat().st_size} bytes, the manifest says "
                                      f"{shard.stat().st_size + 1}"]


def test_a_failed_prepare_removes_everything_it_wrote(tmp_path):
    with pytest.raises(ValueError):
        prepare_toy(tmp_path / "out", ["CCO"] * 20, fail_at=12)
    assert not (tmp_path / "out").exists()
    prepare_toy(tmp_path / "kept", ["CCO"] * 3)
    with pytest.raises(UserError, match="not empty; pass --overwrite"):
        prepare_toy(tmp_path / "kept", ["CCO"])
    prepare_toy(tmp_path / "kept", ["N#N"], overwrite=True)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["manifest.json", "train-000000.tar"]


def test_every_prepare_writes_its_modality_and_readers_refuse_the_other_kind(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("hello world " * 50)
    text = prepare([str(tmp_path / "corpus")], tmp_path / "text", val_fraction=0.0, progress=False)
    images = prepare_images(None, tmp_path / "images", synthetic=36, image_size=16, progress=False)
    assert list(text)[:3] == list(images)[:3] == ["format", "version", "modality"]
    assert (text["modality"], images["modality"]) == ("text", "images")
    for m in (text, images):  # a manifest from before the field: inferred from what it holds
        assert modality_of({k: v for k, v in m.items() if k != "modality"}) == m["modality"]
    with pytest.raises(UserError, match=r"describes images shards, not text; point data.path at the output of "
                                        r"`pretrain prepare`$"):
        ShardDataModule(path=str(tmp_path / "images")).vocab_size
    with pytest.raises(UserError, match=r"describes text shards, not images; point data.path at the output of "
                                        r"`pretrain prepare-images`$"):
        ImageDataModule(path=str(tmp_path / "text")).manifest
    with pytest.raises(UserError, match="describes molecules shards, not text"):
        check_modality(header("molecules"), "text", "x/manifest.json")


def test_an_image_position_saved_before_the_base_split_resumes(tmp_path):
    """Image checkpoints written when ImageDataModule was a ShardDataModule carry seq_len 1 and shuffle_block 1024:
    they resume as ever (the token windows' settings are not the images')."""
    prepare_images(None, tmp_path / "images", synthetic=72, image_size=16, progress=False)

    def datamodule() -> ImageDataModule:
        dm = ImageDataModule(path=str(tmp_path / "images"), image_size=16, batch_size=4, num_workers=0)
        dm.setup("fit")
        return dm

    dm = datamodule()
    batches = iter(dm.train_dataloader())
    dm.on_before_batch_transfer(next(batches), 0)
    state = dm.state_dict()
    assert "seq_len" not in state and state["label_fraction"] == 1.0
    resumed = datamodule()
    resumed.load_state_dict({**state, "seq_len": 1, "shuffle_block": 1024})
    assert next(iter(resumed.train_dataloader()))["sample_ids"].tolist() == next(batches)["sample_ids"].tolist()
