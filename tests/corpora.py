"""Small text corpora the tests prepare (conftest.py's session fixtures, test_finetune, test_init_from)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()

TOPICS = {  # class -> its words; documents mix a few shared words in, so a class is a tendency, not a keyword
    "astro": "star orbit planet comet nebula galaxy moon telescope".split(),
    "bio": "cell gene protein enzyme tissue organ virus membrane".split(),
    "geo": "rock basalt quartz fault magma mantle crust erosion".split(),
}
SHARED = "the of and with under over near from".split()


def lines_corpus(src: Path) -> None:
    """A few hundred KB of varied text: 60 documents of 40 lines of 8 words in shifting cyclic order."""
    src.mkdir(parents=True, exist_ok=True)
    for i in range(60):
        lines = [" ".join(WORDS[(i * 7 + j * 3 + k) % len(WORDS)] for k in range(8)) for j in range(40)]
        (src / f"doc{i:03d}.txt").write_text(f"# document {i}\n" + "\n".join(lines) + "\n")


def mlm_corpus(src: Path) -> None:
    """Random words from a list of 24: a masked letter is given away by its neighbours inside the word, which a
    context-free guess cannot use."""
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        lines = [" ".join(WORDS[rng.integers(len(WORDS))] for _ in range(8)) for _ in range(40)]
        (src / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")


def labelled_jsonl(path: Path, docs: int = 300, seed: int = 0, int_labels: bool = False) -> None:
    """JSON lines {"text", "topic"} of three topics, in turn."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    with open(path, "w") as f:
        for i in range(docs):
            label = names[i % 3]
            words = [rng.choice(TOPICS[label]) if rng.random() < 0.35 else rng.choice(SHARED)
                     for _ in range(rng.randrange(8, 40))]
            f.write(json.dumps({"text": " ".join(words), "topic": names.index(label) if int_labels else label}) + "\n")
