"""`pretrain prepare`: a corpus of text files -> tokenized webdataset tar shards, `tokenizer.json` and `manifest.json`.

    pretrain prepare --input corpus/ --output data/ [--tokenizer bytes|bpe:VOCAB|FILE.json] [--val-fraction 0.01]
                     [--val-input heldout/]
    pretrain prepare --verify data/

Output format (the streaming reader in framework/data/shards.py depends on it):
  train-000000.tar ..., val-000000.tar ...   one member `{key}.u16` (`.u32` for vocabularies over 65536) per document:
                                             its little-endian token ids WITHOUT an end-of-document token
  tokenizer.json                             the HF tokenizer, special tokens included
  manifest.json                              per shard: samples, tokens, bytes, sha256; totals; tokenizer; sources;
                                             modality "text" (schema: framework.data.manifest)

Everything is a pure function of (sorted inputs, arguments): the same corpus gives byte-identical output for any
--workers, so a manifest's sha256s identify a dataset. Documents go to the validation split by a seeded hash of
their source (file and line), never by position, so adding files does not reshuffle the split of the others.

Crash safety: shards are written as NAME.tar.tmp and renamed; manifest.json is written last (temp + rename), so a
directory with a manifest always holds exactly the shards it describes. --overwrite deletes the old manifest
first, then the old shards. A run that fails on bad input removes everything it wrote (framework.data.writer's
output transaction).

Decisions worth knowing:
  - Directories are walked sorted, skipping hidden entries (.git, .DS_Store); symlinked directories are not followed.
  - Files under the output directory are never inputs (so re-preparing `--input . --output ./data` is safe).
  - Binary (contains NUL) and non-UTF-8 files are skipped and counted; --strict fails on the first one instead.
  - A .jsonl line that is not JSON, not an object or lacks a string "text" is always an error naming file:line:
    dropping documents silently is data loss. Blank lines are allowed. A corrupt .gz is an error too.
  - Text is tokenized verbatim: no normalisation, BOMs and line endings are kept (the bytes tokenizer round-trips).
  - `bpe:VOCAB` trains on the train split only, so no validation text shapes the tokenizer.
  - Keys keep the END of a long source path (file name and line), since the start is the least specific part.

The pipeline: framework.data.inputs (discovery, the default corpus, documents, labels, the split) ->
framework.data.tokenizing (token bytes, in input order, by any number of workers) -> framework.data.writer (shards,
manifest). This module ties them together for text.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import time
from pathlib import Path

from framework import __version__
from framework.data.inputs import (HELD_OUT, STDLIB, TASK, LabelPlan, SourceFile, Stats, default_corpus, file_bar,
                                   held_out_files, is_val, iter_documents, plan_labels, resolve_inputs)
from framework.data.manifest import SPLITS, TOKENIZER, header, split_entry
from framework.data.tokenizer import Tokenizer, build_tokenizer, parse_spec
from framework.data.tokenizing import tokenize
from framework.data.writer import ShardOutput, make_key, output_transaction, parse_size, verify
from framework.errors import UserError

# the text prepare's public names, importable from here as before the split (inputs, tokenizing, writer)
__all__ = ["HELD_OUT", "TASK", "build_manifest", "default_corpus", "is_val", "make_key", "parse_size", "prepare",
           "summary", "verify"]


def _check_args(val_fraction: float, workers: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"bad --val-fraction {val_fraction}: it must be in [0, 1), e.g. 0.01")
    if workers < 1:
        raise UserError(f"bad --workers {workers}: it must be at least 1")


def _make_tokenizer(spec: str, files: list[SourceFile], seed: int, val_fraction: float, strict: bool,
                    progress: bool) -> tuple[Tokenizer, str]:
    if parse_spec(spec)[0] != "bpe":
        return build_tokenizer(spec)
    with file_bar(len(files), "reading for bpe", progress) as bar:
        docs = iter_documents(files, Stats(), strict, on_file=lambda _: bar.update())
        train_texts = (d.text for d in docs if not is_val(seed, d.source, d.line, val_fraction))
        return build_tokenizer(spec, train_texts, progress)


def _write_shards(files: list[SourceFile], tok: Tokenizer, output: ShardOutput, seed: int, val_fraction: float,
                  shard_size: int, workers: int, strict: bool, progress: bool,
                  plan: LabelPlan | None = None) -> tuple[Stats, dict[str, list[dict]]]:
    """Tokenize and write every document; the shard size counts token bytes. On failure the transaction closes
    the open shards and deletes what was written."""
    writers = {s: output.writer(s, shard_size) for s in SPLITS}
    stats = Stats()
    start = time.perf_counter()
    with file_bar(len(files), "tokenizing", progress) as bar:
        def on_file(_: int) -> None:
            rate = sum(stats.tokens.values()) / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{stats.bytes / 1e6:.1f} MB, {rate / 1e6:.2f}M tok/s", refresh=False)
            bar.update()

        docs = iter_documents(files, stats, strict, on_file, labels=plan.source if plan else None)
        if plan is not None:
            plan.counts = {s: [0] * len(plan.names) for s in SPLITS}
        # closing(): on an error, shut the worker processes down now, not when the traceback is collected
        with contextlib.closing(tokenize(docs, tok, workers)) as tokenized:
            for doc, data in tokenized:
                if not data:
                    stats.skipped_empty += 1
                    continue
                if plan is None:
                    val = is_val(seed, doc.source, doc.line, val_fraction)
                else:
                    val = (doc.source, doc.line) in plan.val
                split = "val" if doc.held_out or val else "train"
                label = None
                if plan is not None:
                    if doc.label not in plan.names:
                        raise UserError(f"{doc.source}: class '{doc.label}' has no training documents (it "
                                        "occurs only in --val-input); add training documents of that class")
                    label = plan.index(doc)
                    plan.counts[split][label] += 1
                writers[split].write(make_key(stats.documents, doc.source, doc.line),
                                     _members(data, tok.dtype.itemsize, label),
                                     tokens=len(data) // tok.dtype.itemsize, size=len(data))
                stats.documents += 1
                stats.tokens[split] += len(data) // tok.dtype.itemsize
    return stats, {s: w.finish() for s, w in writers.items()}


def _members(data: bytes, itemsize: int, label: int | None) -> list[tuple[str, bytes]]:
    """A document's tar members: `.u16` (`.u32`) its tokens and, for a labelled corpus, `.cls` its class index
    (ASCII, webdataset's convention)."""
    return [("u16" if itemsize == 2 else "u32", data)] + ([("cls", str(label).encode())] if label is not None else [])


def _check_result(stats: Stats, splits: dict[str, list[dict]]) -> None:
    read = f"{stats.files} files read, {stats.skipped_binary} binary/non-UTF-8 skipped, {stats.skipped_empty} empty"
    if stats.documents == 0:
        raise UserError(f"the corpus has no non-empty documents ({read}); point --input at UTF-8 text files")
    if not splits["train"]:
        raise UserError(f"all {stats.documents} documents fell into the validation split; lower --val-fraction "
                        "or add documents")


def build_manifest(tok: Tokenizer, spec: str, tokenizer_text: str, inputs: list[str] | None, stats: Stats,
                   splits: dict[str, list[dict]], seed: int, val_fraction: float, shard_size: int,
                   strict: bool, val_inputs: list[str] | None = None, plan: LabelPlan | None = None) -> dict:
    """The manifest: no timestamps or absolute output paths, so reruns are byte-identical."""
    manifest = {
        **header("text"),
        "dtype": tok.dtype.name,
        "tokenizer": {
            "spec": spec,
            "vocab_size": tok.vocab_size,
            "special_tokens": tok.special_ids,
            "sha256": hashlib.sha256(tokenizer_text.encode("utf-8")).hexdigest(),
        },
        "splits": {s: split_entry(splits[s]) for s in SPLITS},
        "sources": {
            "inputs": list(inputs) if inputs else [STDLIB],
            "files": stats.files,
            "documents": stats.documents,
            "skipped_binary": stats.skipped_binary,
            "skipped_empty": stats.skipped_empty,
            "bytes": stats.bytes,
        },
        "args": {"seed": seed, "val_fraction": val_fraction, "shard_size": shard_size, "strict": strict},
        "created_by": f"framework {__version__}",
    }
    if val_inputs:  # only then, so that the manifests of earlier runs stay byte-identical
        manifest["sources"]["val_inputs"] = list(val_inputs)
    if plan is not None:
        if not inputs:
            manifest["sources"]["inputs"] = [f"<{TASK}>"]
        manifest["labels"] = {"source": plan.source, "names": plan.names, "counts": plan.counts}
    return manifest


def prepare(inputs: list[str] | None, output: str | Path, tokenizer: str = "bytes", val_fraction: float | None = None,
            seed: int = 0, shard_size: int | str = 64 << 20, workers: int = 1, overwrite: bool = False,
            strict: bool = False, progress: bool = True, val_inputs: list[str] | None = None,
            labels: str | None = None) -> dict:
    """Tokenize `inputs` (None: the stdlib corpus) into shards under `output`; returns the manifest.

    `labels`: a .jsonl field holding each document's class (text files: their folder), or TASK for the embedded
    labelled task (inputs None: the functions of the HELD_OUT packages). Labelled shards carry a `.cls` member per
    document, the split is stratified, and the manifest lists the classes and their counts.

    `val_inputs` (files, directories, globs, .jsonl, as `inputs`) all go to the validation split, tokenized with the
    same tokenizer (a trained BPE never sees them); `val_fraction` then defaults to 0 instead of 0.01.

    Raises UserError on bad input, after removing whatever this run wrote. `workers` > 1 starts processes with
    spawn (safe after HF's threads have run), so a script calling this must guard its entry point with
    `if __name__ == "__main__":`.
    """
    started = time.perf_counter()
    out = Path(output).expanduser()
    shard_size = parse_size(shard_size)
    val_fraction = (0.0 if val_inputs else 0.01) if val_fraction is None else val_fraction
    _check_args(val_fraction, workers)
    parse_spec(tokenizer)  # a bad spec fails now, not after reading the corpus
    if labels == TASK and inputs:
        raise UserError(f"--task {TASK} builds its documents from the standard library; drop --input")
    files = resolve_inputs(inputs, exclude=out, task=labels == TASK)
    if not files:
        raise UserError("no input files found; pass --input PATH (files, directories, globs, .jsonl)")
    val_files = held_out_files(val_inputs, files, out) if val_inputs else []
    with output_transaction(out, overwrite) as output:
        # before touching a previous output: a BPE pass that meets bad input leaves the old dataset intact
        tok, spec = _make_tokenizer(tokenizer, files, seed, val_fraction, strict, progress)
        plan = plan_labels(files + val_files, labels, seed, val_fraction, strict, progress) if labels else None
        if overwrite:
            output.remove_previous()
        tokenizer_text = tok.to_str()
        output.write_text(TOKENIZER, tokenizer_text)
        stats, splits = _write_shards(files + val_files, tok, output, seed, val_fraction, shard_size, workers,
                                      strict, progress, plan)
        _check_result(stats, splits)
        manifest = build_manifest(tok, spec, tokenizer_text, inputs, stats, splits, seed, val_fraction, shard_size,
                                  strict, val_inputs, plan)
        output.commit(manifest)  # last: manifest.json commits the run
    if progress:
        print(summary(manifest, out, time.perf_counter() - started), file=sys.stderr)
    return manifest


def summary(manifest: dict, out: Path, seconds: float) -> str:
    src, tr, va = manifest["sources"], manifest["splits"]["train"], manifest["splits"]["val"]
    tokens = tr["tokens"] + va["tokens"]
    tk = manifest["tokenizer"]
    return "\n".join([
        f"prepared {src['files']:,} files -> {out}",
        f"  documents  train {tr['samples']:,}  val {va['samples']:,}   "
        f"(skipped: {src['skipped_binary']:,} binary/non-UTF-8, {src['skipped_empty']:,} empty)",
        f"  tokens     train {tr['tokens']:,}  val {va['tokens']:,}   "
        f"tokenizer {tk['spec']} (vocab {tk['vocab_size']:,}, {manifest['dtype']})",
        f"  shards     train {len(tr['shards'])}  val {len(va['shards'])}   "
        f"(up to {manifest['args']['shard_size'] / 2**20:g} MiB of tokens each)",
        f"  speed      {src['bytes'] / 1e6:.1f} MB in {seconds:.1f} s: {src['bytes'] / 1e6 / seconds:.1f} MB/s, "
        f"{tokens / seconds / 1e6:.2f}M tokens/s",
    ] + ([f"  classes    {len(manifest['labels']['names'])}: " + ", ".join(
        f"{n} ({t}/{v})" for n, t, v in zip(manifest["labels"]["names"], *manifest["labels"]["counts"].values()))
        + "   (train/val documents)"] if "labels" in manifest else []))


