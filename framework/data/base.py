"""`StreamDataModule`: what the datamodule of every modality shares, whatever a sample is.

- the shards: `data.path` (a `prepare-*` output) or explicit `train_shards`/`val_shards`, their manifest and its
  tokenizer (`vocab_size`, `special_ids`, `tokenizer_path`, `check_vocab`);
- the loaders: one batch stream per split (a subclass's `_stream`), read by DataLoader workers that ignore the
  preemption signals;
- the data position, saved in and restored from checkpoints. It is tracked from the batches that actually reach the
  training step (each train batch carries its "position"; `on_before_batch_transfer` records it), never from what the
  DataLoader or Lightning has prefetched. `state_dict()` saves it, `load_state_dict()` restores it (or `skip_to`, a
  later position), and the next `iter(train_dataloader)` continues right after the last trained batch on any world
  size: the global order and exactly-once delivery over ranks x workers are framework.data.cursor's;
- what a task or callback may ask of any datamodule: `last_trained()`, `baseline()` (None when the modality has none).

A modality specialises it in its own file: token windows (framework.data.datamodule: ShardDataModule,
MaskedLMDataModule), whole labelled samples (framework.data.samples: SampleDataModule; documents.py and images.py).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from framework.data import cursor
from framework.data.manifest import MANIFEST, PREPARE, TOKENIZER, check_modality
from framework.data.shards import (Shard, beside, check_same_tokenizer, check_shards, describe, expand, fingerprint,
                                   manifest_shards, read_manifest)
from framework.errors import UserError

POSITION_VERSION = 2  # 2: the epoch's order is a global permutation; segments continue their parent's slots


class BatchStream(Protocol):
    """What the base needs of a modality's stream (TokenStream, SampleStream): a layout over ranks x workers x batch,
    the order and fresh segment of an epoch, and the place to continue from (`segment`, `start_batch`)."""

    shards: list[Shard]
    layout: cursor.Layout
    segment: cursor.Segment | None
    start_batch: int

    @property
    def order(self) -> str: ...

    def fresh_segment(self, epoch: int) -> cursor.Segment: ...


class _ResumableLoader(DataLoader):
    """A DataLoader that asks its datamodule where to start each time an iteration (an epoch) begins."""

    def __init__(self, dataset: IterableDataset, before_iter: Callable[[], None], **kwargs: Any):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._before_iter = before_iter

    def __iter__(self):  # type: ignore[override]
        self._before_iter()
        return super().__iter__()


def _ignore_preemption_signal(worker_id: int) -> None:
    """SLURM delivers SIGUSR1 (and scancel SIGTERM) to every process of the job step; the training process handles
    them (Preemption: checkpoint after the step, then stop), and a worker would otherwise die of them mid-step. The
    training process ends its workers itself when the fit stops."""
    for name in ("SIGUSR1", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


MIN_CORES_FOR_A_WORKER = 4


def default_workers() -> int:
    """data.num_workers when it is not set: 1 when every rank on this node has MIN_CORES_FOR_A_WORKER cores or
    more (the cores this process may run on, over the local ranks a launcher declares: torchrun's
    LOCAL_WORLD_SIZE, SLURM's tasks per node), else 0. With fewer, a worker process takes a core from the model's
    own threads: on 2 cores nanoGPT's CPU config took 1.30x a plain loop's whole-job time with the one worker
    that used to be the default, 1.20x without. Reading token windows in the training process costs a `pread` per
    window (~3 ms a step of 12 windows profiled on a busy 2-core machine, benchmarks/results/vs_minimal_loop.md);
    a modality whose samples cost real work to decode (images) sets its own default."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
    try:
        ranks = max(1, int(local))
    except ValueError:
        ranks = 1
    return 1 if cores // ranks >= MIN_CORES_FOR_A_WORKER else 0


class StreamDataModule(L.LightningDataModule):
    """The shared core of the datamodules (see the module docstring). A subclass implements `setup` (fill `_train`
    and `_val` with shard records) and `_stream` (a BatchStream whose batches carry "position"), and may declare
    `position_settings` (the arguments a saved position depends on) and `_baseline`.

    Args:
        path: directory holding `manifest.json` and the `train-*.tar` / `val-*.tar` shards.
        batch_size: samples per batch, per rank (the micro-batch).
        val_batch_size: samples per validation batch, per rank (default: batch_size).
        num_workers: DataLoader worker processes per rank (0 reads in the training process). Default (None):
            `default_workers()`, 1 when each rank of this node has at least 4 cores, else 0.
        seed: seeds the order of every epoch (and anything random per sample).
        shuffle: shuffle the train split (validation is always read in order).
        train_shards: shard paths, globs, brace patterns or URLs to read instead of the manifest's train split.
        val_shards: the same for validation.
        manifest: manifest path or URL for explicit shards whose manifest is not beside them (by default the
            `manifest.json` beside the first train shard, or the one in `path` without explicit shards).
        skip_corrupt: drop shards that fail the start-up check (size or tar headers vs the manifest) with a warning,
            instead of failing.
        prepare_if_missing: when `path` has no manifest, prepare the modality's embedded data set there first.
    """

    modality = ""  # the manifest's modality this datamodule reads ("text", "images", ...); "": any

    def __init__(self, path: str, batch_size: int = 8, val_batch_size: int | None = None,
                 num_workers: int | None = None,
                 seed: int = 1234, shuffle: bool = True, train_shards: str | list[str] | None = None,
                 val_shards: str | list[str] | None = None, manifest: str | None = None, skip_corrupt: bool = False,
                 prepare_if_missing: bool = False):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {batch_size}")
        num_workers = default_workers() if num_workers is None else num_workers
        if num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0, got {num_workers}")
        self.path, self.batch_size = path, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.seed, self.shuffle = num_workers, seed, shuffle
        self.train_spec, self.val_spec, self.manifest_url = train_shards, val_shards, manifest
        self.skip_corrupt, self.prepare_if_missing = skip_corrupt, prepare_if_missing
        self._manifest: dict | None = None  # the train shards' manifest: vocabulary and special tokens
        self._manifests: dict[str, dict] = {}  # every manifest read, by location
        self._train: list[Shard] = []
        self._val: list[Shard] = []
        # the data position: current segment and how many of its batches every rank has trained on
        self._segment: cursor.Segment | None = None
        self._batches = 0
        self._loaded: dict | None = None  # a restored position, applied at the next train iteration
        self.skip_to: dict | None = None  # a position that replaces the restored one (a rollback: train.run sets it)
        self._train_stream: BatchStream | None = None

    # ---------------------------------------------------------------- manifest and tokenizer
    def _manifest_location(self, spec: str | list[str] | None = None) -> str:
        """The manifest describing `spec`'s shards (default: the train shards): data.manifest when set, else the
        one beside the shards, else the one in data.path. Never data.path's for explicit shards: it describes others."""
        spec = spec if spec is not None else self.train_spec
        if self.manifest_url:
            return self.manifest_url
        if spec:
            first = expand(spec)[0]
            location = beside(first, MANIFEST)
            if location is None:
                raise UserError(f"cannot tell where the manifest of '{first}' is; pass --data.manifest PATH_OR_URL "
                                "(the manifest.json that `pretrain prepare` wrote beside these shards)")
            return location
        return os.path.join(self.path, MANIFEST)

    def _read_manifest(self, spec: str | list[str] | None) -> dict:
        location = self._manifest_location(spec)
        if location not in self._manifests:
            try:
                self._manifests[location] = read_manifest(location)
            except UserError as e:
                if not spec or self.manifest_url:
                    raise
                raise UserError(f"{e}; pass --data.manifest PATH_OR_URL if the manifest is elsewhere") from None
        return self._manifests[location]

    @property
    def manifest(self) -> dict:
        """The train shards' manifest, of this datamodule's `modality` (else one line naming the fix)."""
        if self._manifest is None:
            if not self.train_spec and not os.path.isdir(self.path):
                raise UserError(self._missing_data_message())
            manifest = self._read_manifest(self.train_spec)
            if self.modality:
                check_modality(manifest, self.modality, self._manifest_location())
            self._manifest = manifest
        return self._manifest

    def _missing_data_message(self) -> str:
        make = PREPARE.get(self.modality, "the prepare command of your data")
        return f"data directory '{self.path}' does not exist; run `{make} --output {self.path}` or set data.path"

    def prepare_data(self) -> None:
        """With data.prepare_if_missing, prepare the modality's embedded data set at data.path when it has no
        manifest (Lightning runs this on one process)."""
        if self.prepare_if_missing and not self.train_spec and not os.path.exists(self._manifest_location()):
            self._prepare_embedded()

    def _prepare_embedded(self) -> None:
        """Write the modality's embedded data set to data.path; a modality without one does nothing."""

    @property
    def vocab_size(self) -> int:
        """Tokens in the shards' vocabulary, special tokens included: a model's embedding must be at least this big."""
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def special_ids(self) -> dict[str, int]:
        """Ids of the special tokens: eod (end of document), pad, mask, cls, sep."""
        return {k: int(v) for k, v in self.manifest["tokenizer"]["special_tokens"].items()}

    @property
    def tokenizer_path(self) -> str:
        return os.path.join(os.path.dirname(self._manifest_location()) or ".", TOKENIZER)

    def _shards(self, split: str, spec: str | list[str] | None) -> list[Shard]:
        """The split's shard records, checked: the explicit `spec` (described by its manifest, whose tokenizer must
        be the train shards') or the split as the train shards' manifest lists it."""
        train = self.manifest
        if spec:
            manifest = self._read_manifest(spec)
            check_same_tokenizer(train, manifest, self._manifest_location(), self._manifest_location(spec))
            shards = describe(expand(spec), manifest)
        else:  # the split as listed in the train shards' manifest
            shards = manifest_shards(train, split, os.path.dirname(self._manifest_location()))
        return check_shards(shards, self.skip_corrupt)

    def check_vocab(self, model_vocab_size: int) -> None:
        """Fail at start-up, not at the first out-of-range embedding lookup, when the model's vocabulary is too small."""
        if model_vocab_size < self.vocab_size:
            raise UserError(f"the data's tokenizer has {self.vocab_size} tokens but the model's embedding has "
                            f"{model_vocab_size}; set model.config.vocab_size >= {self.vocab_size} or leave it unset")

    def model_fields(self) -> dict[str, Any]:
        """The model config fields this data fixes (token windows: the vocabulary); a task's explicit
        `model.config` overrides win. None by default."""
        return {}

    def check_model(self, config: Any) -> None:
        """Fail at start-up, with one line, when a model config does not fit this data (token windows: a vocabulary
        or a context too small). Nothing to check by default."""

    def baseline(self) -> dict[str, Any] | None:
        """What the val loss compares with: the best guess that ignores the input, scored on the val split, as
        {"loss", optionally "accuracy" and "name" (default "unigram")}; None without a val split or when the modality
        has no such guess."""
        return self._baseline() if self._val else None

    def _baseline(self) -> dict[str, Any] | None:
        return None

    # ---------------------------------------------------------------- loaders
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def _stream(self, shards: list[Shard], batch_size: int, shuffle: bool, train: bool) -> BatchStream:
        """The split's batch stream on this rank; each batch is a dict holding "position" [epoch, segment, batch]."""
        raise NotImplementedError

    def _loader(self, stream: BatchStream, before_iter: Callable[[], None]) -> DataLoader:
        # Our streams draw no random numbers from torch; a private generator also keeps the DataLoader's per-iterator
        # base seed off the global RNG, so dropout's random stream does not depend on when loaders are iterated
        # (which differs between an uninterrupted and a resumed run).
        assert isinstance(stream, IterableDataset)
        return _ResumableLoader(stream, before_iter, generator=torch.Generator().manual_seed(self.seed),
                                num_workers=self.num_workers, worker_init_fn=_ignore_preemption_signal,
                                pin_memory=torch.cuda.is_available(), persistent_workers=False,
                                prefetch_factor=4 if self.num_workers else None)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        self._train_stream = self._stream(self._train, self.batch_size, self.shuffle, train=True)
        return self._loader(self._train_stream, self._start_train_iteration)

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        stream = self._stream(self._val, self.val_batch_size, shuffle=False, train=False)
        return self._loader(stream, lambda: None)  # validation always reads the whole split from its start

    def _start_train_iteration(self) -> None:
        """Point the train stream at the current position; called when an iteration (an epoch) starts."""
        stream = self._train_stream
        assert stream is not None
        if self._loaded is not None:
            self._apply_loaded(stream)
        if self._segment is None:
            self._segment = stream.fresh_segment(0)
        if self._segment.layout != stream.layout:  # resumed on another world size, worker count or batch size
            self._segment, self._batches = cursor.continue_on(self._segment, self._batches, stream.layout), 0
        if self._batches >= self._segment.batches_per_rank:  # the epoch is done: the next one starts fresh
            self._segment, self._batches = stream.fresh_segment(self._segment.epoch + 1), 0
        stream.segment, stream.start_batch = self._segment, self._batches

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record the position of each train batch as it reaches the training step, and strip it from the batch."""
        if isinstance(batch, dict) and "position" in batch:
            position = batch.pop("position")
            training = self.trainer is None or self.trainer.training  # without a trainer every batch is trained on
            if training and self._segment is not None:
                epoch, index, j = (int(v) for v in position)
                if (epoch, index) == (self._segment.epoch, self._segment.index):
                    self._batches = j + 1
        return batch

    # ---------------------------------------------------------------- checkpointed position
    def position_settings(self) -> dict[str, Any]:
        """The arguments the saved position depends on: a resume with other values is refused, naming the one."""
        return {"seed": self.seed, "shuffle": self.shuffle}

    def last_trained(self) -> dict[str, int] | None:
        """Where the last trained batch came from: epoch, segment and its index among each rank's batches."""
        if self._segment is None:
            return None
        return {"epoch": self._segment.epoch, "segment": self._segment.index, "batch": self._batches - 1}

    def state_dict(self) -> dict[str, Any]:
        if self._segment is None:
            return {}
        return {"version": POSITION_VERSION, **self.position_settings(), "order": self._segment.order,
                "shards": fingerprint(self._train), "segment": self._segment.state(), "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.skip_to is not None:  # a rollback after a loss spike: the checkpoint's weights, a later position
            state_dict, self.skip_to = self.skip_to, None
        self._loaded = dict(state_dict) if state_dict else None

    def _apply_loaded(self, stream: BatchStream) -> None:
        state, self._loaded = self._loaded, None
        assert state is not None
        if state.get("version") != POSITION_VERSION:
            raise UserError(f"the checkpoint's data position has version {state.get('version')}, this framework "
                            f"reads {POSITION_VERSION}; resume with the framework version that wrote it")
        for key, value in self.position_settings().items():
            if key in state and state[key] != value:
                raise UserError(f"the checkpoint was trained with data.{key}={state[key]} but this run has "
                                f"{value}; set data.{key}={state[key]} to resume its data position")
        if state["shards"] != fingerprint(stream.shards):
            raise UserError("the checkpoint's data position belongs to a different set of train shards; resume on "
                            "the same data (same data.path / data.train_shards) or start a new run without --ckpt_path")
        if state["order"] != stream.order:
            raise UserError(f"the checkpoint's data position reads the shards in the '{state['order']}' order but "
                            f"these shards give '{stream.order}' (local files: global; pipe:/http: stream); resume "
                            "with the shards given the same way (local paths or URLs) as when it was written")
        self._segment = cursor.Segment.from_state(state["segment"])
        self._batches = int(state["batches"])
