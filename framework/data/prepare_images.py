"""`pretrain prepare-images`: a folder of images (a sub-folder per class) or the embedded synthetic shapes ->
webdataset tar shards, `tokenizer.json` and `manifest.json`.

    pretrain prepare-images --input photos/ --output data/photos [--val-input heldout/] [--val-fraction 0.05]
    pretrain prepare-images --synthetic 20000 --output data/shapes [--image-size 64] [--class-by shape]

Output format (framework.data.images reads it; so does any webdataset or img2dataset reader):
  train-000000.tar ..., val-000000.tar ...   per sample `{key}.jpg|png|webp` (a folder's file, bytes unchanged),
                                             `{key}.cls` (its class index, ASCII) and `{key}.txt` (its caption, when
                                             it has one)
  tokenizer.json                             the byte tokenizer: a text tower tokenizes the captions on the fly
  manifest.json                              as for text shards (tokens 0), plus "labels" and "images"

Input layout (torchvision's ImageFolder): INPUT/<class>/**/*.jpg|jpeg|png|webp, classes sorted by name; an image's
caption is the text file of the same name beside it (cats/001.jpg -> cats/001.txt).

Everything is a pure function of (inputs, arguments): reruns are byte-identical. The val split is stratified: exactly
round(f * n) images of each class, those with the smallest seeded hash of their path (adding images moves few others).
Each split is shuffled (seeded) before it is written, so no shard holds one class. Every image is checked here (PIL's
`verify`): an undecodable one is skipped, counted in the manifest and named in a warning. A member keeps the format
PIL found, whatever the file's extension. Crash safety and --overwrite are those of `pretrain prepare`.

The embedded dataset (--synthetic N, no download): one saturated shape (SHAPES x COLOURS), small or large, at one of
9 places on a 3x3 grid, on a muted textured background; captioned "a small red triangle at the top left". Classes
are balanced: every block of 36 consecutive indices holds each shape-colour pair once, in a seeded order.
"""

from __future__ import annotations

import hashlib
import io
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from framework import __version__
from framework.data.inputs import file_bar, seeded_hash, walk
from framework.data.manifest import SPLITS, TOKENIZER, header, split_entry
from framework.data.writer import ShardOutput, make_key, output_transaction, parse_size
from framework.data.tokenizer import Tokenizer, build_tokenizer
from framework.errors import UserError

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {"red": (215, 35, 35), "green": (40, 170, 60), "blue": (40, 85, 225), "yellow": (240, 210, 30),
           "purple": (145, 55, 195), "orange": (245, 135, 25)}
SIZES = {"small": 0.30, "large": 0.55}  # the shape's side, as a share of the image's
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("noise", "stripes", "checks")
CLASS_BY = ("shape-colour", "shape")
SYNTHETIC = "<synthetic-shapes>"
FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> member extension
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


# ---------------------------------------------------------------------------------------------------- synthetic

def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2, inner, 1.0)
    return list(zip(radii * np.cos(angles), radii * np.sin(angles)))


_ARM = 0.34  # half the width of the cross's arms
POLYGONS = {  # unit outlines in [-1, 1]^2, y down; the circle is drawn as an ellipse
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "star": _star(),
    "cross": [(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1), (-_ARM, 1),
              (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)],
}


def _attributes(index: int, seed: int) -> tuple[dict[str, str], np.random.Generator]:
    """The attributes of synthetic image `index`, and the generator that draws the rest of it."""
    pairs = len(SHAPES) * len(COLOURS)
    block, slot = divmod(index, pairs)
    pair = int(np.random.default_rng([seed, block, 0x5AA9E5]).permutation(pairs)[slot])
    rng = np.random.default_rng([seed, index, 0x1A6E])
    attrs = {"shape": SHAPES[pair % len(SHAPES)], "colour": list(COLOURS)[pair // len(SHAPES)],
             "size": list(SIZES)[int(rng.integers(len(SIZES)))], "position": POSITIONS[int(rng.integers(9))],
             "background": BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]}
    return attrs, rng


def caption_of(attrs: dict[str, str]) -> str:
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']} at the {attrs['position']}"


def class_names(class_by: str) -> list[str]:
    """The synthetic set's classes, sorted: "blue circle", ... (shape-colour: 36) or "circle", ... (shape: 6)."""
    if class_by == "shape":
        return sorted(SHAPES)
    return sorted(f"{c} {s}" for c in COLOURS for s in SHAPES)


def class_of(attrs: dict[str, str], class_by: str) -> str:
    return attrs["shape"] if class_by == "shape" else f"{attrs['colour']} {attrs['shape']}"


def synthetic_sample(index: int, seed: int, size: int = 64) -> tuple[Image.Image, str, dict[str, str]]:
    """Synthetic image `index` of the set `seed`: (RGB image size x size, caption, attributes); a pure function."""
    attrs, rng = _attributes(index, seed)
    image = Image.fromarray(_background(rng, size, attrs["background"]), "RGB")
    side = SIZES[attrs["size"]] * size
    row, col = divmod(POSITIONS.index(attrs["position"]), 3)
    margin, jitter = 0.06 * size, 0.04 * size
    centre = [margin + side / 2 + k * (size - side - 2 * margin) / 2 + rng.uniform(-jitter, jitter)
              for k in (col, row)]
    cx, cy = (float(np.clip(c, side / 2 + 1, size - side / 2 - 1)) for c in centre)  # always fully inside
    colour = tuple(int(v) for v in np.clip(np.array(COLOURS[attrs["colour"]]) + rng.integers(-12, 13, 3), 0, 255))
    draw, r = ImageDraw.Draw(image), side / 2
    if attrs["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon([(cx + r * x, cy + r * y) for x, y in POLYGONS[attrs["shape"]]], fill=colour)
    return image, caption_of(attrs), attrs


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """A muted texture (grey with a faint tint, low contrast), so the shape's colour is never in doubt."""
    base = rng.integers(70, 180) + rng.integers(-10, 11, 3)  # (3,)
    if kind == "noise":
        light = rng.normal(0, 12, (size, size, 1))
    else:
        period = max(2, int(size * rng.uniform(0.06, 0.2)))
        y, x = np.arange(size)[:, None], np.arange(size)[None, :]
        if kind == "stripes":  # horizontal, vertical or diagonal
            bands = ([y + 0 * x, x + 0 * y, y + x][int(rng.integers(3))] // period) % 2
        else:
            bands = (y // period + x // period) % 2
        light = (bands[..., None] * 2 - 1) * rng.uniform(8, 22)
    return np.clip(base + light, 0, 255).astype(np.uint8)


def encode(image: Image.Image, image_format: str) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        image.save(buf, "JPEG", quality=90)
    else:
        image.save(buf, "PNG", compress_level=1)  # 64 px shapes: level 6 is 2x slower and 5% smaller
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- inputs

@dataclass(frozen=True)
class Item:
    source: str  # names the image: its path relative to its input folder (posix), or "synthetic/NNNNNNNNN"
    label: int
    path: Path | None = None  # None: a synthetic image (its index is in `source`)
    ext: str = ""  # member extension, from the format PIL found
    caption: Path | None = None
    held_out: bool = False  # from --val-input: always in the val split


@dataclass
class Scan:
    items: list[Item]
    names: list[str]
    skipped: list[str]  # undecodable files, as "path (reason)"
    found: int = 0  # image files seen (0: synthetic)


def _class_dirs(root: Path, out: Path, flag: str) -> dict[str, Path]:
    if not root.exists():
        raise UserError(f"{flag} '{root}' does not exist; point it at a folder with one sub-folder per class")
    if not root.is_dir():
        raise UserError(f"{flag} '{root}' is not a directory; it takes a folder with one sub-folder per class "
                        "(INPUT/<class>/*.jpg)")
    dirs = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
            and not d.resolve().is_relative_to(out.resolve())}
    if not dirs:
        raise UserError(f"{flag} '{root}' has no class folders; put each class's images in {root}/<class>/ "
                        "(ImageFolder layout)")
    return dirs


def _list_images(root: Path, out: Path, flag: str, names: list[str] | None, held_out: bool) -> list[Item]:
    """The image files under each class folder, sorted, with the caption beside each (not yet checked)."""
    dirs = _class_dirs(root, out, flag)
    if names is not None and set(dirs) - set(names):
        extra = sorted(set(dirs) - set(names))[0]
        raise UserError(f"class '{extra}' of {flag} '{root}' is not a class of --input; validation classes must be "
                        "training classes: add it to --input or remove it")
    order = sorted(dirs) if names is None else names
    items = []
    for name, d in dirs.items():
        files = [f for f in walk(d, root=root) if not f.path.resolve().is_relative_to(out.resolve())]
        texts = {f.path.with_suffix("") for f in files if f.path.suffix == ".txt"}
        images = [f for f in files if f.path.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise UserError(f"class folder '{d}' holds no images (.jpg, .jpeg, .png, .webp); add images or remove it")
        items += [Item(f.source, order.index(name), f.path, caption=f.path.with_suffix(".txt")
                       if f.path.with_suffix("") in texts else None, held_out=held_out) for f in images]
    return items


def list_folders(input: str, val_input: str | None, out: Path) -> tuple[list[Item], list[str]]:
    """The images of --input and --val-input (not yet checked) and the class names; every listing error is raised
    here, before the output is touched."""
    root = Path(input).expanduser()
    names = sorted(_class_dirs(root, out, "--input"))
    items = _list_images(root, out, "--input", None, held_out=False)
    if val_input is not None:
        val_root = Path(val_input).expanduser()
        a, b = root.resolve(), val_root.resolve()
        if a.is_relative_to(b) or b.is_relative_to(a):
            raise UserError(f"--val-input '{val_input}' overlaps --input '{input}': validation images must not be "
                            "trained on; keep them in separate folders")
        items += _list_images(val_root, out, "--val-input", names, held_out=True)
    return items, names


def check_images(items: list[Item], names: list[str], progress: bool) -> Scan:
    """The images PIL can read (with their member extension); the others are skipped as "path (reason)"."""
    good, bad = [], []
    with file_bar(len(items), "checking images", progress) as bar:
        for item in items:
            assert item.path is not None
            try:
                with Image.open(item.path) as image:
                    kind = image.format
                    image.verify()
                if kind not in FORMATS:
                    raise ValueError(f"{kind} is not JPEG, PNG or WebP")
                good.append(Item(item.source, item.label, item.path, FORMATS[kind], item.caption, item.held_out))
            except PermissionError as e:
                raise UserError(f"cannot read '{item.path}' ({e.strerror}); check its permissions") from None
            except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, ValueError, ...) on bad data
                bad.append(f"{item.path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            bar.update()
    return Scan(good, names, bad, len(items))


def scan_synthetic(n: int, seed: int, class_by: str, image_format: str) -> Scan:
    names = class_names(class_by)
    items = [Item(f"synthetic/{i:09d}", names.index(class_of(_attributes(i, seed)[0], class_by)), ext=image_format)
             for i in range(n)]
    return Scan(items, names, [], 0)


def split_items(scan: Scan, val_fraction: float, seed: int, where: str) -> dict[str, list[Item]]:
    """Stratified split: in each class the round(f * n) images with the smallest seeded hash of their source go to
    val (--val-input images always do); each split then in a seeded shuffled order, for writing."""
    by_class: dict[int, list[Item]] = {}
    splits: dict[str, list[Item]] = {s: [] for s in SPLITS}
    for item in scan.items:
        if item.held_out:
            splits["val"].append(item)
        else:
            by_class.setdefault(item.label, []).append(item)
    for label, name in enumerate(scan.names):
        members = sorted(by_class.get(label, []), key=lambda it: seeded_hash(seed, it.source, 0))
        k = round(val_fraction * len(members))
        if len(members) - k < 1:
            raise UserError(f"class '{name}' has {len(members)} usable image(s): too few for --val-fraction "
                            f"{val_fraction} (none would be left to train on); add images to {where} or lower "
                            "--val-fraction")
        splits["val"] += members[:k]
        splits["train"] += members[k:]
    for i, split in enumerate(SPLITS):
        ordered = sorted(splits[split], key=lambda it: it.source)
        splits[split] = [ordered[j] for j in np.random.default_rng([seed, i, 0x0DE5]).permutation(len(ordered))]
    return splits


# ---------------------------------------------------------------------------------------------------- writing

def _members(item: Item, seed: int, image_size: int) -> list[tuple[str, bytes]]:
    """The tar members of one sample: image, class, caption."""
    if item.path is None:
        image, caption, _ = synthetic_sample(int(item.source.rsplit("/", 1)[1]), seed, image_size)
        data, text = encode(image, item.ext), caption
    else:
        data, text = item.path.read_bytes(), _caption(item.caption)
    return [(item.ext, data), ("cls", str(item.label).encode())] + ([("txt", text.encode())] if text else [])


def _caption(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_bytes().decode("utf-8").strip() or None
    except UnicodeDecodeError:
        raise UserError(f"caption '{path}' is not UTF-8 text; convert it or remove it") from None


def prepare_images(input: str | None, output: str | Path, *, synthetic: int = 0, val_input: str | None = None,
                   val_fraction: float | None = None, seed: int = 0, shard_size: int | str = "64MB",
                   image_size: int = 64, class_by: str = "shape-colour", image_format: str = "png",
                   overwrite: bool = False, progress: bool = True) -> dict:
    """Write the shards of an ImageFolder `input` (or of `synthetic` embedded shapes) under `output`; returns the
    manifest. `val_fraction` defaults to 0.1 for the synthetic set, 0.05 for a folder and 0 with `val_input` (a
    folder of the same layout whose images all go to the val split). `image_size`, `class_by` and `image_format`
    are the synthetic set's. Raises UserError on bad input, after removing whatever this run wrote."""
    started = time.perf_counter()
    out = Path(output).expanduser()
    shard_size = parse_size(shard_size)
    if (input is None) == (synthetic <= 0):
        raise UserError("pass either --input DIR (a folder per class) or --synthetic N (the embedded shapes)")
    if synthetic < 0 or (synthetic and val_input):
        raise UserError("--synthetic N takes a positive N and no --val-input (its val split is --val-fraction)")
    if val_fraction is None:
        val_fraction = 0.1 if synthetic else 0.0 if val_input else 0.05
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"bad --val-fraction {val_fraction}: it must be in [0, 1), e.g. 0.05")
    if class_by not in CLASS_BY or image_format not in ("png", "jpg") or image_size < 16:
        raise UserError(f"bad synthetic options (--class-by {class_by}, --format {image_format}, --image-size "
                        f"{image_size}): use --class-by shape|shape-colour, --format png|jpg, --image-size >= 16")
    # the folders are listed before the output is touched: bad input leaves nothing behind
    listed = list_folders(input, val_input, out) if input is not None else None
    with output_transaction(out, overwrite) as output:
        scan = check_images(*listed, progress) if listed else scan_synthetic(synthetic, seed, class_by, image_format)
        splits = split_items(scan, val_fraction, seed, input or "--synthetic")
        if overwrite:
            output.remove_previous()
        tok, spec = build_tokenizer("bytes")
        output.write_text(TOKENIZER, tok.to_str())
        shards = _write(splits, output, seed, image_size, shard_size, progress)
        manifest = _manifest(scan, splits, shards, tok, spec, input, val_input, synthetic, seed, val_fraction,
                             shard_size, image_size, class_by, image_format)
        output.commit(manifest)  # last: manifest.json commits the run
    if scan.skipped:
        more = f" and {len(scan.skipped) - 10} more" if len(scan.skipped) > 10 else ""
        warnings.warn(f"skipped {len(scan.skipped)} undecodable image(s): {'; '.join(scan.skipped[:10])}{more}",
                      stacklevel=2)
    if progress:
        print(summary(manifest, out, time.perf_counter() - started), file=sys.stderr)
    return manifest


def _write(splits: dict[str, list[Item]], output: ShardOutput, seed: int, image_size: int, shard_size: int,
           progress: bool) -> dict[str, list[dict]]:
    """Every sample, split by split; the shard size counts all member bytes (no tokens)."""
    writers = {s: output.writer(s, shard_size) for s in SPLITS}
    with file_bar(sum(map(len, splits.values())), "writing", progress) as bar:
        for split, items in splits.items():
            for i, item in enumerate(items):
                writers[split].write(make_key(i, item.source.rsplit(".", 1)[0], 0), _members(item, seed, image_size))
                bar.update()
    return {s: w.finish() for s, w in writers.items()}


def _manifest(scan: Scan, splits: dict[str, list[Item]], shards: dict[str, list[dict]], tok: Tokenizer, spec: str,
              input: str | None, val_input: str | None, synthetic: int, seed: int, val_fraction: float,
              shard_size: int, image_size: int, class_by: str, image_format: str) -> dict:
    """The manifest: the text shards' format (tokens 0) plus labels and images; no timestamps or output paths."""
    counts = {s: np.bincount([it.label for it in splits[s]], minlength=len(scan.names)).tolist() for s in SPLITS}
    captioned = len(scan.items) if synthetic else sum(it.caption is not None for it in scan.items)
    manifest = {
        **header("images"),
        "tokenizer": {"spec": spec, "vocab_size": tok.vocab_size, "special_tokens": tok.special_ids,
                      "sha256": hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()},
        "splits": {s: split_entry(shards[s]) for s in SPLITS},
        "labels": {"source": f"synthetic:{class_by}" if synthetic else "folders", "names": scan.names,
                   "counts": counts},
        "images": {"count": len(scan.items), "format": "+".join(sorted({it.ext for it in scan.items})),
                   "image_size": image_size if synthetic else None,
                   "captions": bool(scan.items) and captioned == len(scan.items)},
        "sources": {"inputs": [input] if input else [SYNTHETIC], "files": scan.found, "images": len(scan.items),
                    "captions": captioned, "skipped_undecodable": len(scan.skipped)},
        "args": {"seed": seed, "val_fraction": val_fraction, "shard_size": shard_size, "synthetic": synthetic,
                 "image_size": image_size if synthetic else None, "class_by": class_by if synthetic else None,
                 "image_format": image_format if synthetic else None},
        "created_by": f"framework {__version__}",
    }
    if val_input:
        manifest["sources"]["val_inputs"] = [val_input]
    return manifest


def summary(manifest: dict, out: Path, seconds: float) -> str:
    src, tr, va, im = (manifest["sources"], manifest["splits"]["train"], manifest["splits"]["val"],
                       manifest["images"])
    labels = manifest["labels"]
    classes = ", ".join(f"{n} ({t}/{v})" for n, t, v in list(zip(labels["names"], *labels["counts"].values()))[:8])
    more = f", ... ({len(labels['names'])} in all)" if len(labels["names"]) > 8 else ""
    size = f", {im['image_size']} px" if im["image_size"] else ""
    return "\n".join([
        f"prepared {src['images']:,} images -> {out}",
        f"  images     train {tr['samples']:,}  val {va['samples']:,}   (skipped: {src['skipped_undecodable']:,} "
        f"undecodable)   {im['format']}{size}, captions: {src['captions']:,}",
        f"  classes    {classes}{more}   (train/val images)",
        f"  shards     train {len(tr['shards'])}  val {len(va['shards'])}   "
        f"(up to {manifest['args']['shard_size'] / 2**20:g} MiB each)",
        f"  speed      {src['images'] / max(seconds, 1e-9):,.0f} images/s ({seconds:.1f} s)",
    ])
