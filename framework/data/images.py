"""Images (with classes, with captions) for supervised classification and CLIP.

Shards are webdataset tars with a sample per key: `KEY.jpg|jpeg|png|webp`, optionally `KEY.cls` (class index) and
`KEY.txt` (caption); other members (img2dataset's `KEY.json`) are ignored. Ours come from `pretrain prepare-images`
(framework.data.prepare_images) with a manifest; img2dataset output is read as it is, described from its tar headers.
- `ImageIndex`: where each sample's image and caption are and its class, from the tar headers (nothing is decoded);
  local files, read by random access;
- `ImageTransform`: bytes -> normalized float tensor (3, S, S) in the DataLoader workers: a random resized crop and a
  horizontal flip for training, resize + centre crop for validation; its randomness comes from a generator seeded by
  (data seed, epoch, sample id), so a resume or another world size augments each sample identically;
- `ImageStream`: batches of samples. The unit of the data position is one sample; order, exactly-once delivery and
  resume on any world size are framework.data.cursor's (through samples.SampleStream). An image that cannot be
  decoded becomes a filler row (the batch keeps its size, so every rank runs the same batches) and a warning;
- `ImageDataModule`: the above for Lightning.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import tempfile
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from framework.data.samples import IGNORE_LABEL, SampleDataModule, SampleStream, ShardFiles, tar_entries
from framework.data.prepare_images import prepare_images, synthetic_sample  # noqa: F401  # re-exported
from framework.data.shards import Shard, ShardError, is_local, local_path, shard_name, parse_header, beside, expand
from framework.data.tokenizer import Tokenizer, bytes_tokenizer, load_tokenizer, parse_spec
from framework.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VAL_CROP = 0.875  # validation resizes the shorter side to S / 0.875, then crops S (the ImageNet convention)
# What PIL raises on bad image data (UnidentifiedImageError and truncation are OSErrors; broken PNG chunks SyntaxError)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_COLUMNS = 6  # per sample: image offset, image size, extension, label, caption offset, caption size


# ---------------------------------------------------------------------------------------------------- index

class ImageIndex:
    """Every sample of a list of local image shards, from the tar headers: its shard, the byte offset, size and
    extension of its image, its class (-1 without `.cls`) and its caption's offset and size (-1 without `.txt`).
    Members are grouped by webdataset key (the name up to the first dot of its file name); a key without an image
    is not a sample. With `check` (shards described by a manifest), each shard must hold the samples it lists."""

    def __init__(self, shards: list[Shard], check: bool = True):
        tables = [_scan(s) for s in shards]
        for s, t in zip(shards, tables):
            if check and len(t) != s.samples:
                raise ShardError(f"shard '{s.url}' holds {len(t)} images but the manifest says {s.samples}; it is "
                                 "truncated or replaced: re-run `pretrain prepare-images`")
        table = np.concatenate(tables) if tables else np.empty((0, _COLUMNS), np.int64)
        self.shards = shards
        self.shard = np.repeat(np.arange(len(shards), dtype=np.int32), [len(t) for t in tables])
        self.offset, self.size, self.ext, self.label, self.caption_offset, self.caption_size = table.T.copy()
        self.files = ShardFiles(shards)

    @classmethod
    def from_urls(cls, urls: list[str]) -> ImageIndex:
        """The index of shards that have no manifest (img2dataset output): sample counts come from the headers."""
        shards = []
        for url in urls:
            _check_local(url)
            shards.append(Shard(url, shard_name(url), 0, 0, None))
        index = cls(shards, check=False)
        counts = np.bincount(index.shard, minlength=len(shards))
        index.shards = index.files.shards = [Shard(s.url, s.name, int(n), 0, os.path.getsize(local_path(s.url)))
                                             for s, n in zip(shards, counts)]
        return index

    def __len__(self) -> int:
        return len(self.label)

    def read_image(self, i: int) -> bytes:
        return self.files.read(int(self.shard[i]), int(self.size[i]), int(self.offset[i]))

    def read_caption(self, i: int) -> str | None:
        if self.caption_size[i] < 0:
            return None
        raw = self.files.read(int(self.shard[i]), int(self.caption_size[i]), int(self.caption_offset[i]))
        return raw.decode("utf-8", "replace").strip()

    def key(self, i: int) -> str:
        """Sample i's webdataset key, from the tar header before its image (read when needed: keys are not kept)."""
        s = int(self.shard[i])
        name, _, _ = parse_header(self.files.read(s, 512, int(self.offset[i]) - 512), self.shards[s].url, 0)
        return _split_name(name)[0]

    def close(self) -> None:
        self.files.close()


def describe_image_shards(urls: list[str]) -> list[Shard]:
    """Shard records for image shards without a manifest (img2dataset: KEY.jpg, KEY.txt, KEY.json per sample), their
    sample counts read from the tar headers."""
    return ImageIndex.from_urls(urls).shards


def _check_local(url: str) -> None:
    if not is_local(url):
        raise UserError(f"image shards must be local files (images are read by random access), got '{url}'; copy "
                        "them to local disk and point data.train_shards / data.val_shards at the copies")


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) as webdataset splits a member name: at the first dot of the file name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name[:dot], name[dot + 1:].lower()) if dot > slash + 1 else (name, "")


def _scan(shard: Shard) -> np.ndarray:
    """(samples, _COLUMNS) int64 table of one shard, in the order of the keys' first members."""
    _check_local(shard.url)
    rows: dict[str, list[int]] = {}
    try:
        with open(local_path(shard.url), "rb", buffering=0) as f:
            for name, offset, size in tar_entries(shard):
                key, ext = _split_name(name)
                if ext not in IMAGE_EXTS and ext not in ("cls", "txt"):
                    continue
                row = rows.setdefault(key, [-1] * _COLUMNS)
                if ext in IMAGE_EXTS and row[0] < 0:
                    row[:3] = offset, size, IMAGE_EXTS.index(ext)
                elif ext == "cls":
                    row[3] = int(os.pread(f.fileno(), size, offset))
                elif ext == "txt":
                    row[4:] = offset, size
    except (OSError, ValueError) as e:
        raise ShardError(f"cannot read image shard '{shard.url}' ({e}); re-create it (e.g. `pretrain "
                         "prepare-images`)") from None
    return np.array([r for r in rows.values() if r[0] >= 0], np.int64).reshape(-1, _COLUMNS)


# ---------------------------------------------------------------------------------------------------- transform

class ImageTransform:
    """Image bytes -> float32 tensor (3, S, S), RGB, normalized by mean and std.

    train: an Inception-style random resized crop (area share in crop_scale, aspect ratio log-uniform in ratio; after
    10 rejected draws a centre crop at the nearest allowed ratio) resized to S, then a horizontal flip with p = 0.5
    when hflip (turn it off for captions that say "left" or "right"). Not train: the shorter side resized to
    S / 0.875 (kept when it is already S), then the centre S x S. Both crop and resize in one PIL call (bilinear,
    antialiased); large JPEGs are decoded at a reduced scale that still covers the crop (`draft`)."""

    def __init__(self, image_size: int, train: bool, crop_scale: tuple[float, float] = (0.35, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        if image_size < 1 or not 0 < crop_scale[0] <= crop_scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"bad transform: image_size={image_size}, crop_scale={crop_scale}, ratio={ratio}")
        self.image_size, self.train, self.hflip = image_size, train, hflip
        self.crop_scale, self.ratio = tuple(crop_scale), tuple(ratio)
        mean_, std_ = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        self._scale, self._shift = 1 / (255 * std_), -mean_ / std_  # (x / 255 - mean) / std = x * scale + shift
        # the smallest decode that still leaves the crop >= S pixels on each side
        least = math.sqrt(crop_scale[0] * min(ratio[0], 1 / ratio[1])) if train else VAL_CROP
        self._draft = math.ceil(image_size / least)

    def __call__(self, data: bytes, rng: np.random.Generator) -> torch.Tensor:
        image = Image.open(io.BytesIO(data))
        if image.format == "JPEG":
            image.draft("RGB", (self._draft, self._draft))
        image = image.convert("RGB")
        box = self.crop_box(image.size, rng) if self.train else self.centre_box(image.size)
        S = self.image_size
        image = image.resize((S, S), Image.Resampling.BILINEAR, box=box)
        if self.train and rng.random() < 0.5 and self.hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # uint8 (S, S, 3) -> (3, S, S) before widening: 3x faster than normalizing in numpy, then transposing
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous().float()
        return x.mul_(self._scale).add_(self._shift)  # (3, S, S)

    def crop_box(self, size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a random resized crop of an image of `size` (W, H)."""
        W, H = size
        log_ratio = np.log(self.ratio)
        for _ in range(10):
            area = W * H * rng.uniform(*self.crop_scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= W and 0 < h <= H:
                x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
                return x, y, x + w, y + h
        w, h = W, H
        if W / H < self.ratio[0]:
            h = round(W / self.ratio[0])
        elif W / H > self.ratio[1]:
            w = round(H * self.ratio[1])
        x, y = (W - w) // 2, (H - h) // 2
        return x, y, x + w, y + h

    def centre_box(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The centre square that becomes S x S after the shorter side is resized to S / 0.875 (or kept at S)."""
        W, H = size
        S = self.image_size
        short = min(W, H)
        side = short * S / (S if short == S else round(S / VAL_CROP))  # in the image's own pixels
        x, y = (W - side) / 2, (H - side) / 2
        return x, y, x + side, y + side


# ---------------------------------------------------------------------------------------------------- stream

_WARNED: set[tuple[str, str]] = set()  # (shard, key) already warned about in this process


class ImageStream(SampleStream):
    """Batches of samples: {"images" float32 (B, 3, S, S), "labels" int64 (B,), "valid" bool (B,), "sample_ids"
    int64 (B,), "corrupt" int, "position"}, with captions also {"tokens" int64 (B, L) padded with pad, "lengths"
    int64 (B,)} (the caption's tokens, at most max_caption_tokens, no special tokens; L is the longest of the batch).

    A row that cannot be used (an image PIL cannot decode; with captions, a sample without one) becomes a filler row:
    zeros, label -100, valid False, sample id -1, one pad token; `corrupt` counts them, and a warning names the
    sample and its shard once per process. Labels are -100 where the shards have none. Augmentation is seeded by
    (seed, epoch, sample id). The rest (order, position, fill): see samples.SampleStream."""

    def __init__(self, index: ImageIndex, units: np.ndarray, *, transform: ImageTransform, batch_size: int,
                 seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1, workers: int = 1,
                 fill: bool = False, captions: bool = False, tokenizer: Tokenizer | None = None,
                 max_caption_tokens: int = 64):
        super().__init__(index, units, batch_size=batch_size, seed=seed, shuffle=shuffle, rank=rank, world=world,
                         workers=workers, fill=fill)
        self.transform, self.captions, self.max_caption_tokens = transform, captions, max_caption_tokens
        self.tokenizer = tokenizer if tokenizer is not None or not captions else Tokenizer(bytes_tokenizer())
        self.pad = self.tokenizer.special_ids["pad"] if self.tokenizer is not None else 0

    def _batch(self, samples: np.ndarray, fill: int = 0, epoch: int = 0) -> dict[str, Any]:
        n, S = len(samples) + fill, self.transform.image_size
        images = torch.zeros(n, 3, S, S)
        ids = np.full(n, -1, np.int64)
        captions = [np.full(1, self.pad, np.int64)] * n
        for row, i in enumerate(samples.tolist()):
            sample = self._sample(i, epoch)
            if sample is not None:
                images[row], captions[row] = sample
                ids[row] = i
        valid = ids >= 0
        labels = np.full(n, IGNORE_LABEL, np.int64)
        labels[valid] = np.where(self.index.label[ids[valid]] >= 0, self.index.label[ids[valid]], IGNORE_LABEL)
        batch: dict[str, Any] = {"images": images, "labels": torch.from_numpy(labels),
                                 "valid": torch.from_numpy(valid), "sample_ids": torch.from_numpy(ids),
                                 "corrupt": len(samples) - int(valid.sum())}
        if self.captions:
            lengths = np.array([len(c) for c in captions], np.int64)
            tokens = np.full((n, int(lengths.max(initial=1))), self.pad, np.int64)
            for row, c in enumerate(captions):
                tokens[row, :len(c)] = c
            batch["tokens"], batch["lengths"] = torch.from_numpy(tokens), torch.from_numpy(lengths)
        return batch

    def _sample(self, i: int, epoch: int) -> tuple[torch.Tensor, np.ndarray] | None:
        """(image, caption tokens) of sample i, or None (warned) when it cannot be used."""
        caption = np.empty(0, np.int64)
        if self.captions:
            assert self.tokenizer is not None
            text = self.index.read_caption(i)
            caption = self.tokenizer.encode_array(text or "")[:self.max_caption_tokens].astype(np.int64)
            if not len(caption):
                self._warn(i, "has no caption" if text is None else "has an empty caption")
                return None
        data = self.index.read_image(i)
        try:
            image = self.transform(data, np.random.default_rng([self.seed, epoch, i, 0xA06]))
        except DECODE_ERRORS as e:
            self._warn(i, f"cannot be decoded ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            return None
        return image, caption

    def _warn(self, i: int, problem: str) -> None:
        shard, key = self.index.shards[int(self.index.shard[i])].url, self.index.key(i)
        if (shard, key) not in _WARNED:
            _WARNED.add((shard, key))
            warnings.warn(f"sample '{key}' of shard '{shard}' {problem}: it is replaced by a filler row (label -100, "
                          "valid False)", stacklevel=2)


# ---------------------------------------------------------------------------------------------------- datamodule

class ImageDataModule(SampleDataModule):
    """Image shards for Lightning: `pretrain prepare-images` output (a manifest beside), or img2dataset output
    (explicit `train_shards`/`val_shards`, no manifest: described from the tar headers). Local files only.

    Batches: see ImageStream ("images", "labels", "valid", "sample_ids", "corrupt"; with captions "tokens",
    "lengths"). The data position is a number of samples, saved and checked as every datamodule's (framework.data.base).

    Args:
        path: directory of `pretrain prepare-images` output (manifest.json, tokenizer.json, train-*/val-*.tar).
        image_size: side S of the square images the model gets.
        batch_size: images per batch, per rank. val_batch_size: the same for validation (default batch_size).
        num_workers: DataLoader processes per rank, which decode and augment (0: in the training process).
        seed: seeds the order of every epoch and the augmentation. shuffle: shuffle the train split.
        train_shards, val_shards: shard paths, globs or brace patterns instead of the manifest's splits.
        manifest: the manifest of explicit shards when it is not beside them.
        crop_scale: (min, max) share of the image's area a training crop covers.
        hflip: flip training images horizontally half the time (turn it off when captions say left or right).
        captions: deliver each sample's caption as tokens (CLIP); samples without one become filler rows.
        max_caption_tokens: captions are cut to this many tokens.
        tokenizer: a tokenizer.json for the captions (or `bytes`); default: the one beside the manifest or the
            shards, else the byte tokenizer.
        label_fraction: train on this seeded, stratified share of the train images (few-label linear probes).
        holdout: validate on this held-out share of that subset instead of the val split (see SampleDataModule).
        prepare_if_missing: when `path` has no manifest, prepare `synthetic_samples` embedded synthetic shapes there.
    """

    modality = "images"
    prepare_hint = "`pretrain prepare-images --input DIR` (a sub-folder per class)"

    def __init__(self, path: str = "data/shapes", image_size: int = 64, batch_size: int = 64,
                 val_batch_size: int | None = None, num_workers: int = 2, seed: int = 1234, shuffle: bool = True,
                 train_shards: str | list[str] | None = None, val_shards: str | list[str] | None = None,
                 manifest: str | None = None, crop_scale: tuple[float, float] = (0.35, 1.0), hflip: bool = True,
                 captions: bool = False, max_caption_tokens: int = 64, tokenizer: str | None = None,
                 label_fraction: float = 1.0, holdout: float = 0.0, prepare_if_missing: bool = False,
                 synthetic_samples: int = 20000):
        super().__init__(label_fraction=label_fraction, holdout=holdout, path=path, batch_size=batch_size,
                         val_batch_size=val_batch_size, num_workers=num_workers, seed=seed, shuffle=shuffle,
                         train_shards=train_shards, val_shards=val_shards, manifest=manifest,
                         prepare_if_missing=prepare_if_missing)
        for name, value, least in (("image_size", image_size, 8), ("max_caption_tokens", max_caption_tokens, 1),
                                   ("synthetic_samples", synthetic_samples, 1)):
            if value < least:
                raise UserError(f"data.{name} must be >= {least}, got {value}")
        if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise UserError(f"data.crop_scale must be (min, max) with 0 < min <= max <= 1, got {crop_scale}; "
                            "e.g. [0.35, 1.0]")
        if tokenizer is not None and parse_spec(tokenizer)[0] not in ("bytes", "file"):
            raise UserError(f"data.tokenizer must be a tokenizer.json (or a directory holding one) or bytes, got "
                            f"'{tokenizer}'")
        self.image_size, self.crop_scale, self.hflip = image_size, (float(crop_scale[0]), float(crop_scale[1])), hflip
        self.captions, self.max_caption_tokens, self.tokenizer_spec = captions, max_caption_tokens, tokenizer
        self.synthetic_samples = synthetic_samples
        self._tokenizer: Tokenizer | None = None

    # ---------------------------------------------------------------- manifest, tokenizer
    def _has_manifest(self, spec: str | list[str]) -> bool:
        """Whether explicit shards have a manifest: data.manifest, or one beside them (img2dataset's have none)."""
        urls = expand(spec)
        for url in urls:
            _check_local(url)  # before anything tries to fetch a manifest from a URL
        location = self.manifest_url or beside(urls[0], "manifest.json")
        return location is not None and (not is_local(location) or os.path.exists(local_path(location)))

    @property
    def manifest(self) -> dict:
        """Our manifest of the train shards; {} for shards without one."""
        if self._manifest is None and self.train_spec and not self._has_manifest(self.train_spec):
            self._manifest = {}
        return super().manifest

    def _missing_data_message(self) -> str:
        hint = "" if self.prepare_if_missing else " (or set data.prepare_if_missing=true)"
        return (f"data directory '{self.path}' does not exist; run `pretrain prepare-images --synthetic 20000 "
                f"--output {self.path}` (or --input DIR){hint}, or set data.path")

    def _prepare_embedded(self) -> None:
        """The embedded synthetic shapes."""
        print(f"no shards at '{self.path}': preparing {self.synthetic_samples} synthetic shapes there "
              f"({self.image_size} px)")
        prepare_images(None, self.path, synthetic=self.synthetic_samples, image_size=self.image_size)

    @property
    def has_labels(self) -> bool:
        return bool(self.manifest.get("labels"))

    @property
    def tokenizer_path(self) -> str:
        """The captions' tokenizer.json: data.tokenizer, else the one beside the manifest or the shards, else the
        byte tokenizer's (written once to the temp directory)."""
        if self.tokenizer_spec not in (None, "bytes"):
            return parse_spec(self.tokenizer_spec)[1]
        if self.tokenizer_spec is None:
            near = (os.path.join(os.path.dirname(self._manifest_location()) or ".", "tokenizer.json") if self.manifest
                    else beside(expand(self.train_spec)[0], "tokenizer.json") if self.train_spec else None)
            if near is not None and is_local(near) and os.path.exists(local_path(near)):
                return local_path(near)
        return _bytes_tokenizer_file()

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self.tokenizer.special_ids)

    # ---------------------------------------------------------------- shards
    def _index(self, split: str, spec: str | list[str] | None) -> ImageIndex:
        if spec and not self._has_manifest(spec):
            return ImageIndex.from_urls(expand(spec))
        return ImageIndex(self._shards(split, spec))

    def setup(self, stage: str | None = None) -> None:
        if self._indexes:
            return
        indexes = {split: self._index(split, spec) for split, spec in (("train", self.train_spec),
                                                                       ("val", self.val_spec))}
        if stage in (None, "fit") and not len(indexes["train"]):
            raise UserError(f"no train images found in '{self.train_spec or self.path}'; run `pretrain "
                            "prepare-images` or fix data.path / data.train_shards")
        for split, index in indexes.items():
            if self.has_labels and len(index) and not 0 <= index.label.min() <= index.label.max() < self.num_classes:
                raise ShardError(f"the {split} shards hold class ids outside the manifest's {self.num_classes} "
                                 "classes (or samples without one); re-run `pretrain prepare-images`")
            if self.captions and len(index) and not (index.caption_size >= 0).any():
                raise UserError(f"the {split} images at '{self.train_spec or self.path}' have no captions; prepare "
                                "them with a .txt beside each image, or set data.captions=false")
        if self.label_fraction < 1 and not self.has_labels:
            raise UserError("data.label_fraction < 1 takes a stratified share of labelled images, but these shards "
                            "have no labels; set data.label_fraction=1")
        self._train, self._val = indexes["train"].shards, indexes["val"].shards
        self._indexes = indexes
        self._choose_units(stage, "images")

    def _stream(self, shards: list[Shard], batch_size: int, shuffle: bool, train: bool) -> ImageStream:
        rank, world = self._world()
        split = "train" if train else "val"
        transform = ImageTransform(self.image_size, train, self.crop_scale, hflip=self.hflip)
        return ImageStream(self._indexes[split], self._units[split], transform=transform, batch_size=batch_size,
                           seed=self.seed, shuffle=shuffle, rank=rank, world=world, workers=max(1, self.num_workers),
                           fill=not train, captions=self.captions,
                           tokenizer=self.tokenizer if self.captions else None,
                           max_caption_tokens=self.max_caption_tokens)

    def _baseline(self) -> dict[str, Any]:
        """With captions (a contrastive loss over the global val batch of N pairs): chance, ln N and 1 / N;
        otherwise the class prior (see SampleDataModule)."""
        if self.captions:
            n = self._world()[1] * self.val_batch_size
            return {"name": "chance", "loss": math.log(n), "accuracy": 1 / n}
        return super()._baseline()


def _bytes_tokenizer_file() -> str:
    """A tokenizer.json of the byte tokenizer for shards that have none (checkpoints record the file they trained
    with); the name holds its hash, so every process writing it writes the same bytes."""
    text = Tokenizer(bytes_tokenizer()).to_str()
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"framework-bytes-tokenizer-{digest}.json")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


__all__ = ["DECODE_ERRORS", "IMAGE_EXTS", "ImageDataModule", "ImageIndex", "ImageStream", "ImageTransform",
           "describe_image_shards", "prepare_images", "synthetic_sample"]
