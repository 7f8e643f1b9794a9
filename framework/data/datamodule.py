"""`ShardDataModule`: token shards for Lightning, with the data position saved in and restored from checkpoints.

The position is tracked from the batches that actually reach the training step (each train batch carries its
index; `on_before_batch_transfer` records it), never from what the DataLoader or Lightning has prefetched. It is saved
by `state_dict()` (Lightning calls it when writing a checkpoint) and restored by `load_state_dict()`; the next
`iter(train_dataloader)` continues right after the last trained batch, on any world size.
"""

from __future__ import annotations

import os
import signal
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from framework.data import cursor
from framework.data.manifest import check_modality
from framework.data.shards import (Shard, beside, check_same_tokenizer, check_shards, describe, expand, fingerprint,
                                   manifest_shards, read_manifest)
from framework.data.stream import TokenStream
from framework.errors import UserError

POSITION_VERSION = 2  # 2: the epoch's order is a global permutation; segments continue their parent's slots


class _ResumableLoader(DataLoader):
    """A DataLoader that asks its datamodule where to start each time an iteration (an epoch) begins."""

    def __init__(self, dataset: TokenStream, before_iter: Callable[[], None], **kwargs: Any):
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


class ShardDataModule(L.LightningDataModule):
    """Streams pre-tokenized shards written by `pretrain prepare` and packs them into windows of seq_len + 1 tokens.

    Args:
        path: directory holding `manifest.json`, `tokenizer.json` and the `train-*.tar` / `val-*.tar` shards.
        seq_len: tokens per training example (each window holds seq_len + 1 tokens: inputs and shifted targets).
        batch_size: windows per batch, per rank (the micro-batch).
        val_batch_size: windows per validation batch, per rank (default: batch_size).
        num_workers: DataLoader worker processes per rank (0 reads in the training process).
        seed: seeds the shard order and the permutation of the windows of each epoch.
        shuffle: shuffle the train split (validation is always read in order).
        shuffle_block: only for shards that cannot seek (`pipe:`, http): windows shuffled together by each worker,
            which interleaves 8 sequential streams over its share of the epoch; memory is shuffle_block * (seq_len +
            1) * 8 bytes. Local shards are read by random access in a permutation of the whole epoch.
        train_shards: shard paths, globs, brace patterns or URLs to read instead of the manifest's train split.
        val_shards: the same for validation.
        manifest: manifest path or URL for explicit shards whose manifest is not beside them (by default the
            `manifest.json` beside the first train shard, or the one in `path` without explicit shards).
        skip_corrupt: drop shards that fail the start-up check (size or tar headers vs the manifest) with a warning,
            instead of failing.
        prepare_if_missing: when `path` has no manifest, prepare the embedded default corpus (the Python standard
            library) there first, with `tokenizer`.
        tokenizer: tokenizer spec for `prepare_if_missing` (`bytes` or `bpe:VOCAB`).
    """

    def __init__(self, path: str = "data/stdlib", seq_len: int = 256, batch_size: int = 8,
                 val_batch_size: int | None = None, num_workers: int = 1, seed: int = 1234, shuffle: bool = True,
                 shuffle_block: int = 1024, train_shards: str | list[str] | None = None,
                 val_shards: str | list[str] | None = None, manifest: str | None = None, skip_corrupt: bool = False,
                 prepare_if_missing: bool = False, tokenizer: str = "bytes"):
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("shuffle_block", shuffle_block)):
            if value < 1:
                raise UserError(f"data.{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0, got {num_workers}")
        self.path, self.seq_len, self.batch_size = path, seq_len, batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers, self.seed, self.shuffle, self.shuffle_block = num_workers, seed, shuffle, shuffle_block
        self.train_spec, self.val_spec, self.manifest_url = train_shards, val_shards, manifest
        self.skip_corrupt, self.prepare_if_missing, self.tokenizer_spec = skip_corrupt, prepare_if_missing, tokenizer
        self._manifest: dict | None = None  # the train shards' manifest: vocabulary and special tokens
        self._manifests: dict[str, dict] = {}  # every manifest read, by location
        self._train: list[Shard] = []
        self._val: list[Shard] = []
        # the data position: current segment and how many of its batches every rank has trained on
        self._segment: cursor.Segment | None = None
        self._batches = 0
        self._loaded: dict | None = None  # a restored position, applied at the next train iteration
        self.skip_to: dict | None = None  # a position that replaces the restored one (a rollback: train.run sets it)
        self._train_stream: TokenStream | None = None

    # ---------------------------------------------------------------- shards and tokenizer
    def _manifest_location(self, spec: str | list[str] | None = None) -> str:
        """The manifest describing `spec`'s shards (default: the train shards): data.manifest when set, else the
        one beside the shards, else the one in data.path. Never data.path's for explicit shards: it describes others."""
        spec = spec if spec is not None else self.train_spec
        if self.manifest_url:
            return self.manifest_url
        if spec:
            first = expand(spec)[0]
            location = beside(first, "manifest.json")
            if location is None:
                raise UserError(f"cannot tell where the manifest of '{first}' is; pass --data.manifest PATH_OR_URL "
                                "(the manifest.json that `pretrain prepare` wrote beside these shards)")
            return location
        return os.path.join(self.path, "manifest.json")

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

    def prepare_data(self) -> None:
        """Prepare the embedded corpus when asked to and its shards are absent (Lightning runs this on one process)."""
        if self.prepare_if_missing and not self.train_spec and not os.path.exists(self._manifest_location()):
            from framework.data.prepare import prepare

            print(f"no shards at '{self.path}': preparing the default corpus there (tokenizer {self.tokenizer_spec})")
            prepare(None, self.path, tokenizer=self.tokenizer_spec)

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            if not self.train_spec and not os.path.isdir(self.path):
                hint = (" (set data.prepare_if_missing=true to prepare the default corpus there)"
                        if not self.prepare_if_missing else "")
                raise UserError(f"data directory '{self.path}' does not exist; run `pretrain prepare --output "
                                f"{self.path}` or set data.path{hint}")
            manifest = self._read_manifest(self.train_spec)
            check_modality(manifest, "text", self._manifest_location())
            self._manifest = manifest
        return self._manifest

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
        return os.path.join(os.path.dirname(self._manifest_location()) or ".", "tokenizer.json")

    def _shards(self, split: str, spec: str | list[str] | None) -> list[Shard]:
        train = self.manifest
        if spec:
            manifest = self._read_manifest(spec)
            check_same_tokenizer(train, manifest, self._manifest_location(), self._manifest_location(spec))
            shards = describe(expand(spec), manifest)
        else:  # the split as listed in the train shards' manifest
            shards = manifest_shards(train, split, os.path.dirname(self._manifest_location()))
        return check_shards(shards, self.skip_corrupt)

    def setup(self, stage: str | None = None) -> None:
        if self._train or self._val:
            return
        self._train = self._shards("train", self.train_spec)
        self._val = self._shards("val", self.val_spec)
        if stage in (None, "fit") and not self._train:
            raise UserError(f"no train shards found for '{self.train_spec or self.path}'; "
                            "run `pretrain prepare` or fix data.path / data.train_shards")
        windows = sum(s.stream_len for s in self._val) // self.window_len
        if self._val and windows < self._world()[1] * self.val_batch_size:
            warnings.warn(f"the val split has {windows} windows of {self.window_len} tokens, fewer than one batch "
                          "on every rank: validation is skipped (prepare with a larger --val-fraction)", stacklevel=2)

    def unigram_baseline(self) -> dict[str, float]:
        """Val loss (nats/token) of the best context-free model: the train split's unigram distribution."""
        from framework.data.shards import unigram_cross_entropy

        return {"loss": unigram_cross_entropy(self._train, self._val, self.special_ids["eod"], self.vocab_size)}

    def check_vocab(self, model_vocab_size: int) -> None:
        """Fail at start-up, not at the first out-of-range embedding lookup, when the model's vocabulary is too small."""
        if model_vocab_size < self.vocab_size:
            raise UserError(f"the data's tokenizer has {self.vocab_size} tokens but the model's embedding has "
                            f"{model_vocab_size}; set model.config.vocab_size >= {self.vocab_size} or leave it unset")

    # ---------------------------------------------------------------- loaders
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    @property
    def window_len(self) -> int:
        """Tokens of the corpus stream in one example: seq_len + 1 here (inputs and the shifted next-token targets)."""
        return self.seq_len + 1

    def batch_transform(self, train: bool) -> Callable[[dict, int], dict] | None:
        """What a subclass does to each batch in the DataLoader worker (e.g. masking for masked LM); None: nothing."""
        return None

    def _stream(self, shards: list[Shard], batch_size: int, shuffle: bool, train: bool) -> TokenStream:
        rank, world = self._world()
        eod = self.special_ids["eod"]
        return TokenStream(shards, seq_len=self.window_len - 1, batch_size=batch_size, eod=eod,
                           vocab_size=self.vocab_size, seed=self.seed, shuffle=shuffle,
                           shuffle_block=self.shuffle_block, rank=rank, world=world,
                           workers=max(1, self.num_workers), transform=self.batch_transform(train))

    def _loader(self, stream: TokenStream, before_iter: Callable[[], None]) -> DataLoader:
        # Our streams draw no random numbers from torch; a private generator also keeps the DataLoader's per-iterator
        # base seed off the global RNG, so dropout's random stream does not depend on when loaders are iterated
        # (which differs between an uninterrupted and a resumed run).
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
    def last_trained(self) -> dict[str, int] | None:
        """Where the last trained batch came from: epoch, segment and its index among each rank's batches."""
        if self._segment is None:
            return None
        return {"epoch": self._segment.epoch, "segment": self._segment.index, "batch": self._batches - 1}

    def state_dict(self) -> dict[str, Any]:
        if self._segment is None:
            return {}
        return {"version": POSITION_VERSION, "seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "shuffle_block": self.shuffle_block, "order": self._segment.order, "shards": fingerprint(self._train),
                "segment": self._segment.state(), "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.skip_to is not None:  # a rollback after a loss spike: the checkpoint's weights, a later position
            state_dict, self.skip_to = self.skip_to, None
        self._loaded = dict(state_dict) if state_dict else None

    def _apply_loaded(self, stream: TokenStream) -> None:
        state, self._loaded = self._loaded, None
        assert state is not None
        if state.get("version") != POSITION_VERSION:
            raise UserError(f"the checkpoint's data position has version {state.get('version')}, this framework "
                            f"reads {POSITION_VERSION}; resume with the framework version that wrote it")
        for key in ("seq_len", "seed", "shuffle", "shuffle_block"):
            if state[key] != getattr(self, key):
                raise UserError(f"the checkpoint was trained with data.{key}={state[key]} but this run has "
                                f"{getattr(self, key)}; set data.{key}={state[key]} to resume its data position")
        if state["shards"] != fingerprint(stream.shards):
            raise UserError("the checkpoint's data position belongs to a different set of train shards; resume on "
                            "the same data (same data.path / data.train_shards) or start a new run without --ckpt_path")
        if state["order"] != stream.order:
            raise UserError(f"the checkpoint's data position reads the shards in the '{state['order']}' order but "
                            f"these shards give '{stream.order}' (local files: global; pipe:/http: stream); resume "
                            "with the shards given the same way (local paths or URLs) as when it was written")
        self._segment = cursor.Segment.from_state(state["segment"])
        self._batches = int(state["batches"])



class MaskedLMDataModule(ShardDataModule):
    """ShardDataModule for masked LM: packed windows of seq_len - 1 corpus tokens, `<|cls|>` first and `<|sep|>`
    between documents (RoBERTa's full-sentence packing), masked in the DataLoader workers.

    Batches are `{"input_ids", "labels"}` (B, seq_len) each: labels hold the original id where a token was chosen
    for prediction and -100 elsewhere (framework.objectives.masked_lm.mask_tokens). Each window's masks are seeded by
    (data.seed, epoch, its index in the epoch), so resumes and world-size changes mask exactly as an uninterrupted
    run; validation always masks VAL_MASK_RATE of the tokens with the same masks, so its numbers compare across runs.

    Args:
        mask_rate: fraction of each window's ordinary tokens chosen for prediction during training (MosaicBERT and
            ModernBERT found 30% better than BERT's 15% for base-size encoders).
        **the rest**: see ShardDataModule.
    """

    VAL_MASK_RATE = 0.15

    def __init__(self, mask_rate: float = 0.3, **kwargs: Any):
        super().__init__(**kwargs)
        if not 0 < mask_rate < 1:
            raise UserError(f"data.mask_rate must be in (0, 1), got {mask_rate}; BERT used 0.15, ModernBERT 0.3")
        if self.seq_len < 3:  # <|cls|> + a window of at least 2 corpus tokens
            raise UserError(f"data.seq_len must be >= 3 for masked LM, got {self.seq_len}")
        self.mask_rate = mask_rate

    @property
    def window_len(self) -> int:
        return self.seq_len - 1  # + <|cls|> = seq_len; no shifted target

    def check_specials(self) -> None:
        missing = [name for name in ("mask", "cls", "sep", "pad") if name not in self.special_ids]
        if missing:
            raise UserError(f"the data's tokenizer has no {', '.join('<|' + m + '|>' for m in missing)} token, which "
                            "masked LM needs; prepare the shards with this framework's tokenizers (`pretrain prepare "
                            "--tokenizer bytes|bpe:N`) or add the token to your tokenizer.json's special tokens")

    def batch_transform(self, train: bool) -> Callable[[dict, int], dict]:
        self.check_specials()
        ids = self.special_ids
        return MaskingTransform(rate=self.mask_rate if train else self.VAL_MASK_RATE, seed=self.seed,
                                fixed_epoch=None if train else 0, vocab_size=self.vocab_size,
                                cls=ids["cls"], sep=ids["sep"], eod=ids["eod"], mask=ids["mask"],
                                special_ids=sorted(set(ids.values())))

    def unigram_baseline(self) -> dict[str, float]:
        """Loss and accuracy of the best context-free guess for a masked token (the train split's unigram
        distribution over ordinary tokens, scored on the val split's)."""
        from framework.data.shards import unigram_counts

        special = sorted(set(self.special_ids.values()))
        train = unigram_counts(self._train, self.special_ids["eod"], self.vocab_size)
        val = unigram_counts(self._val, self.special_ids["eod"], self.vocab_size)
        train[special], val[special] = 0, 0
        p = (train + 1) / (train.sum() + self.vocab_size - len(special))
        p[special] = 1.0  # never scored (val counts are 0 there); keeps the log finite
        loss = float(-(val * np.log(p)).sum() / max(1, val.sum()))
        accuracy = float(val[int(train.argmax())] / max(1, val.sum()))
        return {"loss": loss, "accuracy": accuracy}


@dataclass
class MaskingTransform:
    """Windows -> `<|cls|>` + window (eod -> sep) -> masked inputs and labels; runs in the DataLoader workers."""

    rate: float
    seed: int
    fixed_epoch: int | None  # validation masks the same way every time
    vocab_size: int
    cls: int
    sep: int
    eod: int
    mask: int
    special_ids: list[int]

    def __call__(self, batch: dict, epoch: int) -> dict:
        from framework.objectives.masked_lm import mask_tokens

        window = batch.pop("tokens")  # (B, seq_len - 1)
        window = torch.where(window == self.eod, self.sep, window)
        tokens = torch.cat([torch.full((window.size(0), 1), self.cls, dtype=window.dtype), window], dim=1)  # (B, T)
        inputs, labels = mask_tokens(tokens, rate=self.rate, mask_id=self.mask, special_ids=self.special_ids,
                                     vocab_size=self.vocab_size, seed=self.seed,
                                     epoch=epoch if self.fixed_epoch is None else self.fixed_epoch,
                                     sample_ids=batch["sample_ids"].tolist())
        # "predicted" is a Python int, which device transfer leaves on the host: FLOP counting needs no device sync
        return {**batch, "input_ids": inputs, "labels": labels, "predicted": int((labels != -100).sum())}
