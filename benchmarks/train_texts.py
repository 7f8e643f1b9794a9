"""Unlabelled pre-training text from labelled sets: the texts of their TRAIN split only, without labels, as a .jsonl
of `{"text": ...}` lines. The split is the one `pretrain prepare --label-field FIELD --val-fraction F --seed S` makes
of the same input paths (framework.data.inputs.plan_labels: stratified, by a seeded hash of each line's source), so a
model pre-trained on this file has never read a sentence of the val split it is later scored on.

    python benchmarks/train_texts.py ../shared/data/subj.jsonl ../shared/data/cr.jsonl --output data/text-train.jsonl
    pretrain prepare --input data/text-train.jsonl --tokenizer bpe:4096 --val-fraction 0.05 --output data/text-bpe4096
    pretrain prepare --input ../shared/data/subj.jsonl --label-field label --val-fraction 0.2 --seed 0 \\
        --tokenizer data/text-bpe4096/tokenizer.json --output data/subj-bpe4096

Pass each input exactly as it is passed to `pretrain prepare` (the split hashes the path as given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from framework.data.inputs import Stats, iter_documents, plan_labels, resolve_inputs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="labelled .jsonl files, each split on its own as prepare splits it")
    p.add_argument("--output", required=True)
    p.add_argument("--label-field", default="label")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)  # e.g. data/, on a fresh clone
    tmp = f"{a.output}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as out:
        for path in a.inputs:
            files = resolve_inputs([path])
            plan = plan_labels(files, a.label_field, a.seed, a.val_fraction, strict=False, progress=False)
            kept = 0
            for doc in iter_documents(files, Stats(), False, labels=a.label_field):
                if doc.text and (doc.source, doc.line) not in plan.val:
                    out.write(json.dumps({"text": doc.text}) + "\n")
                    kept += 1
            print(f"{path}: {kept} train texts written, {len(plan.val)} val texts left out")
    os.replace(tmp, a.output)


if __name__ == "__main__":
    main()
