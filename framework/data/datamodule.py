"""Token windows: `ShardDataModule` packs the documents of `pretrain prepare` shards into windows of seq_len + 1
tokens (causal LM); `MaskedLMDataModule` frames and masks them (masked LM). The order, the saved data position and
the loaders are framework.data.base's; the windows and their order within an epoch are framework.data.stream's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from framework.data.base import StreamDataModule
from framework.data.shards import Shard
from framework.data.stream import TokenStream
from framework.errors import UserError


class ShardDataModule(StreamDataModule):
    """Streams pre-tokenized shards written by `pretrain prepare` and packs them into windows of seq_len + 1 tokens.

    Args:
        path: directory holding `manifest.json`, `tokenizer.json` and the `train-*.tar` / `val-*.tar` shards.
        seq_len: tokens per training example (each window holds seq_len + 1 tokens: inputs and shifted targets).
        batch_size: windows per batch, per rank (the micro-batch).
        val_batch_size: windows per validation batch, per rank (default: batch_size).
        num_workers: DataLoader worker processes per rank (0 reads in the training process; default: 1 when each
            rank of the node has 4 cores or more, else 0, framework.data.base.default_workers).
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
        teacher_cache: a `pretrain distill-cache` directory for these shards: each train batch also carries the
            teacher's cached top-k log-probabilities of its windows (framework.data.teacher_cache), for a
            distillation run without a teacher in memory.
    """

    modality = "text"

    def __init__(self, path: str = "data/stdlib", seq_len: int = 256, batch_size: int = 8,
                 val_batch_size: int | None = None, num_workers: int | None = None, seed: int = 1234,
                 shuffle: bool = True,
                 shuffle_block: int = 1024, train_shards: str | list[str] | None = None,
                 val_shards: str | list[str] | None = None, manifest: str | None = None, skip_corrupt: bool = False,
                 prepare_if_missing: bool = False, tokenizer: str = "bytes", teacher_cache: str | None = None):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("shuffle_block", shuffle_block)):
            if value < 1:
                raise UserError(f"data.{name} must be >= 1, got {value}")
        super().__init__(path=path, batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers,
                         seed=seed, shuffle=shuffle, train_shards=train_shards, val_shards=val_shards,
                         manifest=manifest, skip_corrupt=skip_corrupt, prepare_if_missing=prepare_if_missing)
        self.seq_len, self.shuffle_block, self.tokenizer_spec = seq_len, shuffle_block, tokenizer
        self.teacher_cache, self.teacher_cache_meta = teacher_cache, None

    # ---------------------------------------------------------------- shards
    def _missing_data_message(self) -> str:
        hint = (" (set data.prepare_if_missing=true to prepare the default corpus there)"
                if not self.prepare_if_missing else "")
        return (f"data directory '{self.path}' does not exist; run `pretrain prepare --output {self.path}` or set "
                f"data.path{hint}")

    def _prepare_embedded(self) -> None:
        from framework.data.prepare import prepare

        print(f"no shards at '{self.path}': preparing the default corpus there (tokenizer {self.tokenizer_spec})")
        prepare(None, self.path, tokenizer=self.tokenizer_spec)

    def setup(self, stage: str | None = None) -> None:
        if self._train or self._val:
            return
        self._train = self._shards("train", self.train_spec)
        self._val = self._shards("val", self.val_spec)
        if self.teacher_cache is not None:
            self._open_teacher_cache()
        if stage in (None, "fit") and not self._train:
            raise UserError(f"no train shards found for '{self.train_spec or self.path}'; "
                            "run `pretrain prepare` or fix data.path / data.train_shards")
        windows = sum(s.stream_len for s in self._val) // self.window_len
        if self._val and windows < self._world()[1] * self.val_batch_size:
            warnings.warn(f"the val split has {windows} windows of {self.window_len} tokens, fewer than one batch "
                          "on every rank: validation is skipped (prepare with a larger --val-fraction)", stacklevel=2)

    def model_fields(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size}

    def check_model(self, config: Any) -> None:
        self.check_vocab(config.vocab_size)
        if self.seq_len > config.seq_len:
            raise UserError(f"data.seq_len={self.seq_len} is longer than the model's context "
                            f"(seq_len={config.seq_len}); lower data.seq_len or set model.config.seq_len")

    def _baseline(self) -> dict[str, float]:
        """Val loss (nats/token) of the best context-free model: the train split's unigram distribution."""
        from framework.data.shards import unigram_cross_entropy

        return {"loss": unigram_cross_entropy(self._train, self._val, self.special_ids["eod"], self.vocab_size)}

    # ---------------------------------------------------------------- windows
    @property
    def window_len(self) -> int:
        """Tokens of the corpus stream in one example: seq_len + 1 here (inputs and the shifted next-token targets)."""
        return self.seq_len + 1

    def batch_transform(self, train: bool) -> Callable[[dict, int], dict] | None:
        """What a subclass does to each batch in the DataLoader worker (e.g. masking for masked LM); None: nothing."""
        return None

    def _open_teacher_cache(self) -> None:
        from framework.data.teacher_cache import check_cache, describe_data, read_meta

        if type(self).batch_transform is not ShardDataModule.batch_transform:
            raise UserError(f"data.teacher_cache is for causal-LM windows; {type(self).__name__} transforms its "
                            "batches (e.g. masking), which a cache of next-token outputs does not follow")
        assert self.teacher_cache is not None
        self.teacher_cache_meta = meta = read_meta(self.teacher_cache)
        check_cache(meta, self.teacher_cache, describe_data(self._train, seed=self.seed, shuffle=self.shuffle,
                                                            seq_len=self.window_len - 1))

    def _stream(self, shards: list[Shard], batch_size: int, shuffle: bool, train: bool) -> TokenStream:
        rank, world = self._world()
        eod = self.special_ids["eod"]
        transform = self.batch_transform(train)
        if train and self.teacher_cache_meta is not None:
            from framework.data.teacher_cache import CacheLookup

            transform = CacheLookup(str(self.teacher_cache), self.teacher_cache_meta["epochs"], inner=transform)
        return TokenStream(shards, seq_len=self.window_len - 1, batch_size=batch_size, eod=eod,
                           vocab_size=self.vocab_size, seed=self.seed, shuffle=shuffle,
                           shuffle_block=self.shuffle_block, rank=rank, world=world,
                           workers=max(1, self.num_workers), transform=transform)

    def position_settings(self) -> dict[str, Any]:
        return {"seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "shuffle_block": self.shuffle_block}


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

    def _baseline(self) -> dict[str, float]:
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
