"""The manifest schema every `prepare-*` writes beside its shards, and the modality check every reader makes.

`manifest.json` (written last, so a directory with one holds exactly the shards it lists):
  format     "framework-shards"
  version    1
  modality   what a sample is: "text" (token ids per document), "images" (image + class + caption), ...; manifests of
             earlier versions have none and are read by `modality_of`, which infers it from what they hold
  splits     {"train": {"shards": [{"name", "samples", "tokens", "bytes", "sha256"}, ...], "samples", "tokens"},
              "val": ...}
  tokenizer  {"spec", "vocab_size", "special_tokens", "sha256"} of the `tokenizer.json` beside (when there is one)
  sources, args, created_by, and what the modality adds ("labels", "images", ...)
No timestamps and no absolute output paths: the same inputs give a byte-identical manifest.
"""

from __future__ import annotations

from framework.errors import UserError

MANIFEST, TOKENIZER = "manifest.json", "tokenizer.json"
FORMAT, VERSION = "framework-shards", 1
SPLITS = ("train", "val")
PREPARE = {"text": "pretrain prepare", "images": "pretrain prepare-images", "graphs": "pretrain prepare-molecules"}  # how each modality's shards are made


def header(modality: str) -> dict:
    """The first fields of every manifest; a prepare adds its own after them."""
    return {"format": FORMAT, "version": VERSION, "modality": modality}


def split_entry(shards: list[dict]) -> dict:
    """One split of the manifest from the shard records a ShardWriter returns."""
    return {"shards": shards, "samples": sum(s["samples"] for s in shards), "tokens": sum(s["tokens"] for s in shards)}


def modality_of(manifest: dict) -> str:
    """The manifest's modality; one written before the field existed is "images" when it describes images, else
    "text" (the only two kinds those versions wrote)."""
    if "modality" in manifest:
        return str(manifest["modality"])
    return "images" if "images" in manifest else "text"


def check_modality(manifest: dict, expected: str, where: str, option: str = "data.path") -> None:
    """Fail in one line naming the fix when `manifest` (read from `where`) describes another kind of shards."""
    found = modality_of(manifest)
    if found != expected:
        make = PREPARE.get(expected, f"the prepare command for {expected}")
        raise UserError(f"'{where}' describes {found} shards, not {expected}; point {option} at the output of "
                        f"`{make}`")
