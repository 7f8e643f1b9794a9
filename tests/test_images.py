"""Images: the embedded synthetic set, prepare-images, reading our shards and img2dataset's, the image stream's
exactly-once order, resume, augmentation seeding, filler rows, captions, and the datamodule end to end."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from framework.data.cursor import continue_on
from framework.data.images import (IGNORE_LABEL, ImageDataModule, ImageIndex, ImageStream, ImageTransform,
                                   describe_image_shards)
from framework.commands.prepare_images import main
from framework.data.prepare_images import (COLOURS, POSITIONS, SIZES, caption_of, class_names, prepare_images,
                                           synthetic_sample)
from framework.data.shards import manifest_shards
from framework.errors import UserError

PX = 32


@pytest.fixture(scope="module")
def shapes(image_shards) -> Path:
    """240 synthetic images in shards of 24 KB (conftest.py, shared by the run)."""
    return image_shards(synthetic=240, image_size=PX, shard_size="24KB")


def _index(path: Path, split: str) -> ImageIndex:
    return ImageIndex(manifest_shards(json.loads((path / "manifest.json").read_text()), split, str(path)))


def _stream(index: ImageIndex, **kw) -> ImageStream:
    train = kw.pop("train", True)
    transform = ImageTransform(PX, train, hflip=kw.pop("hflip", True))
    return ImageStream(index, kw.pop("units", np.arange(len(index))), transform=transform,
                       batch_size=kw.pop("batch_size", 4), seed=kw.pop("seed", 3), **kw)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _image_bytes(colour: tuple[int, int, int], fmt: str = "JPEG", size: tuple[int, int] = (20, 14)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


# ---------------------------------------------------------------- the synthetic set
def test_synthetic_images_are_deterministic_balanced_and_match_their_captions():
    a, b = synthetic_sample(5, seed=1), synthetic_sample(5, seed=1)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and a[1:] == b[1:]
    assert not np.array_equal(np.asarray(a[0]), np.asarray(synthetic_sample(5, seed=2)[0]))
    pairs = set()
    for i in range(36):
        image, caption, attrs = synthetic_sample(i, seed=0, size=64)
        assert image.size == (64, 64) and image.mode == "RGB" and caption == caption_of(attrs)
        pairs.add((attrs["shape"], attrs["colour"]))
        # the shape is the only patch of its colour: its bounding box gives its place and size
        mask = (np.abs(np.asarray(image, np.int64) - COLOURS[attrs["colour"]]) <= 14).all(-1)
        ys, xs = np.nonzero(mask)
        assert mask.sum() > 40, caption
        assert 0 < xs.min() and xs.max() < 63 and 0 < ys.min() and ys.max() < 63  # fully inside
        col, row = (int(np.digitize((v.min() + v.max()) / 2 / 64, [0.42, 0.58])) for v in (xs, ys))
        assert POSITIONS[3 * row + col] == attrs["position"], caption
        width = (xs.max() - xs.min() + 1) / 64
        assert abs(width - SIZES[attrs["size"]]) < 0.08, (caption, width)
    assert len(pairs) == 36  # each block of 36 indices holds every shape-colour class once


# ---------------------------------------------------------------- prepare-images
def test_prepare_synthetic_writes_a_stratified_shuffled_reproducible_dataset(shapes, tmp_path):
    m = json.loads((shapes / "manifest.json").read_text())
    assert m["format"] == "framework-shards" and m["tokenizer"]["spec"] == "bytes"
    assert m["images"] == {"count": 240, "format": "png", "image_size": PX, "captions": True}
    assert m["labels"]["names"] == class_names("shape-colour") and len(m["labels"]["names"]) == 36
    counts = m["labels"]["counts"]
    assert all(v == round(0.1 * (t + v)) for t, v in zip(counts["train"], counts["val"]))  # exactly, per class
    train = m["splits"]["train"]
    assert train["samples"] == sum(counts["train"]) == 240 - 36 and train["tokens"] == 0
    assert len(train["shards"]) > 1 and (shapes / "tokenizer.json").is_file()
    with tarfile.open(shapes / train["shards"][0]["name"]) as tf:
        names = tf.getnames()
        assert [n.rsplit(".", 1)[1] for n in names[:3]] == ["png", "cls", "txt"]
        labels = [int(tf.extractfile(n).read()) for n in names if n.endswith(".cls")]
    assert len(set(labels)) > 10  # a shard mixes the classes
    index = _index(shapes, "train")
    assert np.bincount(index.label, minlength=36).tolist() == counts["train"]
    # a rerun elsewhere is byte-identical, file by file
    again = tmp_path / "again"
    prepare_images(None, again, synthetic=240, image_size=PX, shard_size="24KB", progress=False)
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in shapes.iterdir())
    for p in shapes.iterdir():
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name


def test_prepare_a_folder_skips_undecodable_images_keeps_bytes_and_captions(tmp_path):
    src = tmp_path / "photos"
    for c, colour in (("cats", (200, 60, 60)), ("dogs", (60, 60, 200))):
        (src / c / "more").mkdir(parents=True)
        for i in range(5):
            folder = src / c / ("more" if i == 4 else "")
            (folder / f"{i}.jpg").write_bytes(_image_bytes(colour))
        (src / c / "0.txt").write_text(f"a {c} picture\n")
    (src / "cats" / "bad.jpg").write_bytes(b"not an image at all")
    (src / "dogs" / "png.jpg").write_bytes(_image_bytes((1, 2, 3), "PNG"))  # a PNG named .jpg stays a PNG
    with pytest.warns(UserWarning, match=r"skipped 1 undecodable image.*bad\.jpg"):
        m = prepare_images(str(src), tmp_path / "out", val_fraction=0.2, progress=False)
    assert m["labels"]["names"] == ["cats", "dogs"] and m["labels"]["counts"] == {"train": [4, 5], "val": [1, 1]}
    assert m["sources"]["skipped_undecodable"] == 1 and m["sources"]["captions"] == 2
    assert m["images"] == {"count": 11, "format": "jpg+png", "image_size": None, "captions": False}
    index = ImageIndex([s for split in ("train", "val") for s in manifest_shards(m, split, str(tmp_path / "out"))])
    originals = {p.read_bytes() for p in src.rglob("*.jpg")}
    assert all(index.read_image(i) in originals for i in range(len(index)))  # stored unchanged
    captions = sorted(c for c in (index.read_caption(i) for i in range(len(index))) if c)
    assert captions == ["a cats picture", "a dogs picture"]
    # a held-out folder of the same layout is the whole val split
    held = tmp_path / "held" / "dogs"
    held.mkdir(parents=True)
    (held / "x.png").write_bytes(_image_bytes((9, 9, 9), "PNG"))
    with pytest.warns(UserWarning, match="bad.jpg"):
        m = prepare_images(str(src), tmp_path / "out2", val_input=str(tmp_path / "held"), progress=False)
    assert m["labels"]["counts"] == {"train": [5, 6], "val": [0, 1]} and m["sources"]["val_inputs"]


@pytest.mark.parametrize("case,fragment", [
    ("missing", "does not exist"),
    ("no-classes", "has no class folders"),
    ("empty-class", "holds no images"),
    ("overlap", "overlaps --input"),
    ("too-few", "too few for --val-fraction"),
    ("both", "pass either --input DIR"),
    ("bad-choice", "see `pretrain prepare-images --help`"),
    ("synthetic-option", "--image-size is an option of --synthetic"),
])
def test_bad_input_is_one_line_and_leaves_nothing_behind(tmp_path, case, fragment):
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.png").write_bytes(_image_bytes((1, 2, 3), "PNG"))
    out = tmp_path / "out"
    args = {"missing": ["--input", str(tmp_path / "nope")],
            "no-classes": ["--input", str(src / "a")],
            "empty-class": ["--input", str(src), "--val-fraction", "0"],
            "overlap": ["--input", str(src), "--val-input", str(src / "a")],
            "too-few": ["--input", str(src), "--val-fraction", "0.6"],
            "both": ["--input", str(src), "--synthetic", "10"],
            "bad-choice": ["--synthetic", "10", "--class-by", "colour"],
            "synthetic-option": ["--input", str(src), "--image-size", "32"]}[case]
    if case == "empty-class":
        (src / "b").mkdir()
    with pytest.raises(UserError) as e:
        main([*args, "--output", str(out)])
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


# ---------------------------------------------------------------- the transform
def test_transform_crops_flips_and_normalizes():
    image, _, _ = synthetic_sample(7, seed=0, size=PX)
    png = io.BytesIO()
    image.save(png, "PNG")
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    val = ImageTransform(PX, train=False)(png.getvalue(), np.random.default_rng(0))
    torch.testing.assert_close(val, (pixels - mean) / std)  # an S px image is validated as it is
    rng = lambda: np.random.default_rng([1, 2])  # noqa: E731
    flipped, plain = (ImageTransform(PX, True, crop_scale=(1, 1), ratio=(1, 1), hflip=h)(png.getvalue(), rng())
                      for h in (True, False))
    assert torch.equal(plain, val) and torch.equal(flipped, val.flip(-1))  # this draw flips; hflip=False never does
    t = ImageTransform(16, True, crop_scale=(0.9, 1.0))
    for size in ((200, 10), (10, 200)):  # no allowed crop fits: the centre crop at the nearest allowed ratio
        box = t.crop_box(size, np.random.default_rng(0))
        assert abs((box[2] - box[0]) / (box[3] - box[1]) - (4 / 3 if size[0] > size[1] else 3 / 4)) < 0.2
    big = _image_bytes((30, 200, 90), size=(900, 700))  # decoded at a reduced scale (JPEG draft), same result
    for train in (True, False):
        out = ImageTransform(16, train)(big, np.random.default_rng(3))
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32
        colour = (torch.tensor([30, 200, 90]).view(3, 1, 1) / 255 - mean) / std
        assert (out - colour).abs().max() < 0.15


# ---------------------------------------------------------------- img2dataset shards
def test_img2dataset_shards_are_read_as_they_are(tmp_path):
    d = tmp_path / "i2d"
    d.mkdir()
    captions = {}
    for s in range(2):
        members = []
        for k in range(3):
            key = f"{s:05d}{k:04d}"
            captions[key] = f"photo {s}-{k}"
            members += [(f"{key}.jpg", _image_bytes((40 * k, 100, 30 * s))), (f"{key}.txt", captions[key].encode()),
                        (f"{key}.json", b'{"url": "http://x"}')]
        _tar(d / f"{s:05d}.tar", members)
    (d / "00000_stats.json").write_text("{}")
    shards = describe_image_shards([str(d / "00000.tar"), str(d / "00001.tar")])
    assert [(s.samples, s.tokens) for s in shards] == [(3, 0), (3, 0)]
    index = ImageIndex(shards)
    assert [index.key(i) for i in range(6)] == list(captions) and (index.label == -1).all()
    assert [index.read_caption(i) for i in range(6)] == list(captions.values())
    assert Image.open(io.BytesIO(index.read_image(4))).size == (20, 14)
    dm = ImageDataModule(train_shards=str(d / "*.tar"), val_shards=str(d / "00001.tar"), image_size=16, batch_size=2,
                         num_workers=0, captions=True, hflip=False)
    dm.setup("fit")
    assert not dm.has_labels and dm.vocab_size == 261 and Path(dm.tokenizer_path).is_file()
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 3, 16, 16) and (batch["labels"] == IGNORE_LABEL).all()
    for row, i in enumerate(batch["sample_ids"].tolist()):
        text = bytes(batch["tokens"][row, :batch["lengths"][row]].tolist()).decode()
        assert text == captions[index.key(i)]
    with pytest.raises(UserError, match="have no labels"):
        dm.num_classes  # noqa: B018
    with pytest.raises(UserError, match="must be local files"):
        describe_image_shards(["https://example.com/00000.tar"])


# ---------------------------------------------------------------- the stream
def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(shapes):
    index = _index(shapes, "train")  # 204 samples
    batches = {(r, w): list(_stream(index, rank=r, world=2, workers=2)._segment_batches(w, 2))
               for r in range(2) for w in range(2)}
    per_rank = [sum(len(batches[r, w]) for w in range(2)) for r in range(2)]
    assert per_rank[0] == per_rank[1] == 204 // 8  # every rank runs the same number of batches
    ids = np.concatenate([b["sample_ids"].numpy() for bs in batches.values() for b in bs])
    assert len(ids) == len(set(ids.tolist())) and 204 - len(ids) < 2 * 4  # all but a tail < one batch per rank
    assert ids.tolist() != sorted(ids.tolist())
    first = batches[0, 0][0]
    assert first["images"].shape == (4, 3, PX, PX) and first["images"].dtype == torch.float32
    assert first["labels"].tolist() == index.label[first["sample_ids"].numpy()].tolist()
    assert first["valid"].all() and first["corrupt"] == 0 and "tokens" not in first


def test_resume_on_another_world_size_and_augmentation_follow_the_sample(shapes):
    index = _index(shapes, "train")
    streams = [_stream(index, rank=r, world=2) for r in range(2)]
    done = [b for s in streams for b in list(s)[:5]]  # 5 batches on each of 2 ranks
    rest_stream = _stream(index, batch_size=3)
    rest_stream.segment = continue_on(streams[0].fresh_segment(0), 5, rest_stream.layout)
    rest = list(rest_stream)
    seen = np.concatenate([b["sample_ids"].numpy() for b in done + rest])
    assert len(seen) == len(set(seen.tolist())) and len(seen) > 204 - 3  # nothing repeated, a tail < 3 lost
    # the same sample in the same epoch is cropped and flipped the same way, whatever the layout
    images = {i: b["images"][k] for b in done + rest for k, i in enumerate(b["sample_ids"].tolist())}
    compared = 0
    for b in _stream(index, batch_size=6):
        for k, i in enumerate(b["sample_ids"].tolist()):
            if i in images:  # not in a lost tail
                assert torch.equal(b["images"][k], images[i])
                compared += 1
    assert compared > 190
    epoch1 = _stream(index, batch_size=6)
    epoch1.segment = epoch1.fresh_segment(1)
    b = next(iter(epoch1))
    assert not all(torch.equal(b["images"][k], images[i]) for k, i in enumerate(b["sample_ids"].tolist()))


def test_validation_covers_every_sample_once_with_filler_rows(shapes):
    index = _index(shapes, "val")  # 36 samples over 2 ranks x batch 5: 4 batches each, 4 fillers
    batches = [list(_stream(index, rank=r, world=2, batch_size=5, shuffle=False, fill=True, train=False))
               for r in range(2)]
    assert len(batches[0]) == len(batches[1]) == 4
    rows = [(i, l, v, img) for bs in batches for b in bs
            for i, l, v, img in zip(b["sample_ids"].tolist(), b["labels"].tolist(), b["valid"].tolist(), b["images"])]
    assert sorted(i for i, *_ in rows if i >= 0) == list(range(36))
    fillers = [(l, v, img) for i, l, v, img in rows if i < 0]
    assert len(fillers) == 4 and all(l == IGNORE_LABEL and not v and not img.any() for l, v, img in fillers)
    again = next(iter(_stream(index, batch_size=5, shuffle=False, fill=True, train=False)))
    assert torch.equal(again["images"], batches[0][0]["images"])  # validation draws nothing random


def test_an_undecodable_image_becomes_a_filler_row_with_one_warning(tmp_path):
    members = []
    for k in range(6):
        data = b"\x89PNG garbage" if k == 2 else _image_bytes((50 * k, 80, 80), "PNG")
        members += [(f"s{k}.png", data), (f"s{k}.cls", str(k % 2).encode())]
    _tar(tmp_path / "bad.tar", members)
    index = ImageIndex(describe_image_shards([str(tmp_path / "bad.tar")]))
    stream = _stream(index, batch_size=6, shuffle=False)
    with pytest.warns(UserWarning, match=r"sample 's2' of shard '.*bad\.tar' cannot be decoded"):
        batch = next(iter(stream))
    assert batch["images"].shape[0] == 6 and batch["corrupt"] == 1
    assert batch["valid"].tolist() == [True, True, False, True, True, True]
    assert batch["labels"].tolist() == [0, 1, IGNORE_LABEL, 1, 0, 1] and batch["sample_ids"][2] == -1
    assert not batch["images"][2].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per sample and process: the second epoch is quiet
        next(iter(stream))


def test_captions_are_tokenized_truncated_and_padded(shapes):
    index = _index(shapes, "val")
    batch = next(iter(_stream(index, batch_size=20, shuffle=False, fill=True, train=False, captions=True,
                              max_caption_tokens=12)))
    pad = 257  # the byte tokenizer's <|pad|>
    for row, i in enumerate(batch["sample_ids"].tolist()):
        n = int(batch["lengths"][row])
        assert bytes(batch["tokens"][row, :n].tolist()).decode() == index.read_caption(i)[:12]
        assert (batch["tokens"][row, n:] == pad).all()
    filled = next(iter(_stream(index, batch_size=40, shuffle=False, fill=True, train=False, captions=True)))
    assert filled["tokens"].shape[0] == 40 and filled["lengths"][36:].tolist() == [1] * 4
    assert (filled["tokens"][36:, 0] == pad).all() and filled["tokens"].shape[1] == int(filled["lengths"].max())


# ---------------------------------------------------------------- the datamodule
def _ids(batch: dict) -> list[int]:
    return batch["sample_ids"].tolist()


def test_the_datamodule_resumes_exactly_through_a_worker_process(shapes):
    def module(**kw) -> ImageDataModule:
        return ImageDataModule(path=str(shapes), image_size=PX, batch_size=8, num_workers=1, seed=5, **kw)

    dm = module()
    assert dm.num_classes == 36 and dm.class_names[0] == "blue circle" and dm.image_size == PX
    uninterrupted = [(_ids(b), b["images"]) for b in dm.train_dataloader()]
    assert len(uninterrupted) == 204 // 8
    dm = module()
    for n, batch in enumerate(dm.train_dataloader()):
        dm.on_before_batch_transfer(batch, 0)  # as Lightning does for every trained batch
        if n == 2:
            break
    state = dm.state_dict()
    resumed = module()
    resumed.load_state_dict(state)
    batch = next(iter(resumed.train_dataloader()))
    assert _ids(batch) == uninterrupted[3][0] and torch.equal(batch["images"], uninterrupted[3][1])
    for kw, key in (({"seed": 6}, "data.seed"), ({"label_fraction": 0.5}, "data.label_fraction")):
        other = ImageDataModule(path=str(shapes), image_size=PX, batch_size=8, num_workers=0, **kw)
        other.load_state_dict(state)
        with pytest.raises(UserError, match=key):
            next(iter(other.train_dataloader()))


def test_label_fraction_and_the_class_prior_baseline(shapes):
    dm = ImageDataModule(path=str(shapes), image_size=PX, batch_size=4, num_workers=0, label_fraction=0.5)
    dm.setup("fit")
    counts = np.bincount(dm.train_labels(), minlength=36)
    assert counts.min() >= 1 and counts.sum() < 204 * 0.6
    base = dm.baseline()
    assert base["name"] == "class prior" and abs(base["loss"] - np.log(36)) < 0.2 and base["accuracy"] <= 1 / 36 + 1e-9
    assert dm.val_labels().tolist() == _index(shapes, "val").label.tolist()


def test_prepare_if_missing_makes_the_synthetic_set(tmp_path):
    dm = ImageDataModule(path=str(tmp_path / "shapes"), image_size=16, batch_size=4, num_workers=0,
                         prepare_if_missing=True, synthetic_samples=72)
    with pytest.raises(UserError, match="does not exist"):
        ImageDataModule(path=str(tmp_path / "none")).manifest  # noqa: B018
    dm.prepare_data()
    dm.setup("fit")
    assert dm.manifest["images"]["count"] == 72 and len(dm._indexes["train"]) + len(dm._indexes["val"]) == 72
