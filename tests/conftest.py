"""Shared test setup: the `gpu` marker's skip, and the data and checkpoints several test files use, built once per
test run (session scope, in a `tmp_path_factory` directory) and shared.

Session fixtures (all read-only: a test that changes their files must work on its own copy,
shutil.copytree(shards, tmp_path / ...)):
  text_shards(corpus, val_fraction)  a byte-tokenized text corpus, prepared on first use per (corpus, val_fraction);
                                     corpora: "words" (dist_fit.make_corpus: 12 docs of random words with numbers),
                                     "lines" (60 docs of cyclic word lines, a few hundred KB), "mlm" (40 docs of random
                                     words from a list of 24, where a masked letter is given away by its word)
  shards                             text_shards("words", 0.0): the common small corpus (no val split)
  labelled                           labelled documents for classification (300 docs, 3 topics, val 0.2)
  image_shards(**kw)                 the synthetic shapes set (`prepare_images(None, ...)`), made once per kw
  shapes                             image_shards(synthetic=2400, image_size=32, val_fraction=0.15, seed=0)
  gpt_checkpoint, bert_checkpoint    last.ckpt of a 1-step gpt-tiny / bert-test fit on text_shards("lines", 0.1)
  clip_checkpoint                    last.ckpt of a 1-step clip-test fit on `shapes`

Whether a test changed a shared directory is checked when the session ends (names, sizes, mtimes).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

# test helpers (shardkit, worker scripts) live beside the tests
sys.path.insert(0, str(Path(__file__).parent))
# the references some tests compare against (transformers), which launch/setup.sh installs beside the venv rather than
# in it; last on the path, so the venv's own packages come first. The processes the tests start do not see them.
if (Path(sys.prefix) / "reference").is_dir():
    sys.path.append(str(Path(sys.prefix) / "reference"))

from corpora import labelled_jsonl, lines_corpus, mlm_corpus  # noqa: E402 - beside the tests


if os.environ.get("PYTEST_XDIST_WORKER"):
    # several test processes share the cores: torch's threads (2 per process by default here) would spin-wait on
    # each other's cores, which made one model's steps 9x slower than on one thread; the processes a test starts
    # inherit the setting
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where CUDA is available and are skipped, with the reason, elsewhere. Under
    pytest-xdist (launch/test.sh), the tests on the network-namespace cluster run in one test process, one after
    the other (xdist group "cluster"): its namespaces, bridge and SLURM daemons are one per machine."""
    for item in items:
        if {"netns_cluster", "slurm_cluster"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("cluster"))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- shared read-only data, made once per run
def _words_corpus(src: Path) -> None:
    from dist_fit import make_corpus

    make_corpus(src)


CORPORA = {"words": _words_corpus, "lines": lines_corpus, "mlm": mlm_corpus}


def _snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


class _Shared:
    """Builds each shared directory once and remembers what it held, to tell at the end whether a test changed it."""

    def __init__(self, factory) -> None:
        self.factory, self.made = factory, {}

    def get(self, key, build) -> Path:
        if key not in self.made:
            path = build(self.factory)
            self.made[key] = (path, _snapshot(path))
        return self.made[key][0]

    def changed(self) -> list[str]:
        return [f"{key}: {path}" for key, (path, before) in self.made.items() if _snapshot(path) != before]


@pytest.fixture(scope="session")
def _shared(tmp_path_factory):
    shared = _Shared(tmp_path_factory)
    yield shared
    changed = shared.changed()
    assert not changed, ("a test changed shared fixture data (work on a copy: shutil.copytree); changed: "
                         + ", ".join(changed))


@pytest.fixture(scope="session")
def text_shards(_shared):
    """text_shards(corpus="words", val_fraction=0.0) -> the directory of that corpus prepared with the byte
    tokenizer (seed 0); made on first use, shared by the whole run. Read only."""
    def get(corpus: str = "words", val_fraction: float = 0.0) -> Path:
        def build(factory) -> Path:
            from framework.data.prepare import prepare

            src = factory.mktemp(f"corpus-{corpus}")
            CORPORA[corpus](src)
            out = factory.mktemp(f"shards-{corpus}-{val_fraction}") / "data"
            prepare([str(src)], out, tokenizer="bytes", val_fraction=val_fraction, seed=0, progress=False)
            return out

        return _shared.get(("text", corpus, val_fraction), build)

    return get


@pytest.fixture(scope="session")
def shards(text_shards) -> Path:
    """The common small corpus: dist_fit.make_corpus (12 documents of random words), bytes, no val split."""
    return text_shards("words", 0.0)


@pytest.fixture(scope="session")
def labelled(_shared) -> Path:
    """Labelled shards for classification: labelled_jsonl's 300 documents, `prepare --labels topic`, val 0.2."""
    def build(factory) -> Path:
        from framework.data.prepare import prepare

        src = factory.mktemp("labelled")
        labelled_jsonl(src / "train.jsonl")
        out = src / "data"
        prepare([str(src / "train.jsonl")], out, val_fraction=0.2, progress=False, labels="topic")
        return out

    return _shared.get(("labelled",), build)


@pytest.fixture(scope="session")
def image_shards(_shared):
    """image_shards(**kw) -> the synthetic shapes set, `prepare_images(None, out, progress=False, **kw)`; made once
    per kw, shared by the whole run. Read only."""
    def get(**kw) -> Path:
        def build(factory) -> Path:
            from framework.data.images import prepare_images

            out = factory.mktemp("shapes") / "data"
            prepare_images(None, out, progress=False, **kw)
            return out

        return _shared.get(("images", *sorted(kw.items())), build)

    return get


@pytest.fixture(scope="session")
def shapes(image_shards) -> Path:
    """The synthetic set at 32 px, 2400 images: 36 colour x shape classes, captions, val 0.15."""
    return image_shards(synthetic=2400, image_size=32, val_fraction=0.15, seed=0)


def _one_step_checkpoint(_shared, text_shards, family: str) -> Path:
    def build(factory) -> Path:
        from dist_fit import write_config

        from framework.commands.fit import fit

        tmp = factory.mktemp(f"{family}-1step")
        fit(["--config", str(write_config(tmp, text_shards("lines", 0.1), strategy="auto", devices=1, max_steps=1,
                                          family=family))])
        return tmp / "run" / "checkpoints"

    return _shared.get(("checkpoint", family), build) / "last.ckpt"


@pytest.fixture(scope="session")
def gpt_checkpoint(_shared, text_shards) -> Path:
    """last.ckpt of a 1-step gpt-tiny fit (in this process, fp32, bytes tokenizer) on text_shards("lines", 0.1)."""
    return _one_step_checkpoint(_shared, text_shards, "gpt")


@pytest.fixture(scope="session")
def bert_checkpoint(_shared, text_shards) -> Path:
    """last.ckpt of a 1-step bert-test masked-LM fit (in this process) on text_shards("lines", 0.1)."""
    return _one_step_checkpoint(_shared, text_shards, "bert")


@pytest.fixture(scope="session")
def clip_checkpoint(_shared, shapes) -> Path:
    """last.ckpt of a 1-step clip-test fit (in this process, batch 8, W&B off) on `shapes` with captions."""
    def build(factory) -> Path:
        import json

        from framework.commands.fit import fit

        tmp = factory.mktemp("clip-1step")
        config = {
            "seed_everything": 7,
            "model": {"class_path": "framework.tasks.clip.CLIPTask",
                      "init_args": {"preset": "clip-test", "lr": 1e-3, "warmup_steps": 0}},
            "data": {"class_path": "framework.data.images.ImageDataModule",
                     "init_args": {"path": str(shapes), "image_size": 32, "batch_size": 8, "num_workers": 0,
                                   "captions": True, "max_caption_tokens": 30, "hflip": False}},
            "trainer": {"default_root_dir": str(tmp / "run"), "accelerator": "cpu", "devices": 1, "max_steps": 1,
                        "limit_val_batches": 0, "enable_progress_bar": False, "enable_model_summary": False},
            "checkpoint": {"every_n_steps": 1, "keep": 1},
            "summary": {"sample_tokens": 0},
            "wandb": {"mode": "disabled"},
        }
        (tmp / "config.json").write_text(json.dumps(config))
        fit(["--config", str(tmp / "config.json")])
        return tmp / "run" / "checkpoints"

    return _shared.get(("checkpoint", "clip"), build) / "last.ckpt"
