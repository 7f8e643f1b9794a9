"""Tokenizers: byte-level identity (`bytes`), byte-level BPE trained on the corpus (`bpe:VOCAB`), or a HF file.

Every tokenizer is a Hugging Face `tokenizers` tokenizer saved as `tokenizer.json` beside the shards, so any HF-aware
tool can decode them. Five special tokens are always present. They are only ever inserted at document boundaries
by the framework, never produced from text: a document that contains the literal string "<|endoftext|>" is
tokenized as ordinary bytes (`encode_special_tokens = True`; HF does not save that flag, so `load_tokenizer` sets it).

The `bytes` tokenizer maps byte b to id b (0..255) with specials at 256..260. It is a BPE model without merges over
the 256 symbols of the ByteLevel alphabet, which HF encodes exactly like `text.encode("utf-8")`; `Tokenizer.encode`
takes that fast path (numpy, no HF call) when it recognises the identity tokenizer.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from framework.errors import UserError

# name -> token; dict order is the id order of the specials in tokenizers we build
SPECIAL_TOKENS: dict[str, str] = {
    "eod": "<|endoftext|>",
    "pad": "<|pad|>",
    "mask": "<|mask|>",
    "cls": "<|cls|>",
    "sep": "<|sep|>",
}
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the specials: no room for a single merge below it


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters: the symbols of HF's ByteLevel alphabet."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in out:  # control bytes, space, etc. get code points 256.. so they survive as visible characters
            out[b] = chr(256 + extra)
            extra += 1
    return out


class Tokenizer:
    """The framework's view of a HF tokenizer: encode/decode without specials, the special ids, the shard dtype."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self.hf.encode_special_tokens = True  # a literal "<|endoftext|>" in text is text, not a document boundary
        vocab = hf.get_vocab(with_added_tokens=True)
        missing = [tok for tok in SPECIAL_TOKENS.values() if tok not in vocab]
        if missing:
            raise UserError(f"tokenizer lacks the special tokens {missing}; re-create it with `pretrain prepare`")
        self.special_ids: dict[str, int] = {name: vocab[tok] for name, tok in SPECIAL_TOKENS.items()}
        # max id + 1, not len(vocab): a hand-made file may leave holes in its ids, and embeddings are indexed by id
        self.vocab_size: int = max(vocab.values()) + 1
        self.dtype = np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.uint32)
        self.is_bytes: bool = _is_byte_identity(json.loads(hf.to_str()))

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(text))

    def to_str(self) -> str:
        """The tokenizer.json text; deterministic (HF serialises vocab and merges in id/rank order)."""
        return self.hf.to_str(pretty=True) + "\n"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as a little-endian array of `self.dtype`: the exact bytes a shard member holds."""
        le = self.dtype.newbyteorder("<")
        if self.is_bytes:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(le)
        return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, dtype=le)

    def encode_hf(self, text: str) -> list[int]:
        """Always through HF, even for the bytes tokenizer: the reference the fast path is tested against."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are shown (an eod reads as "<|endoftext|>")."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json written by `pretrain prepare` (or any HF tokenizer.json that has our special tokens)."""
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # HF raises a bare Exception for unreadable/invalid files
        raise UserError(f"cannot load tokenizer '{path}' ({_one_line(e)}); point to a HF tokenizer.json") from None
    return Tokenizer(hf)


def build_tokenizer(spec: str, texts: Iterable[str] | None = None, progress: bool = False) -> tuple[Tokenizer, str]:
    """Build the tokenizer a `--tokenizer` spec names; returns it and the spec's canonical name for the manifest.

    `texts` (an iterator of documents) is only consumed for `bpe:VOCAB`, which trains on it.
    """
    kind, arg = parse_spec(spec)
    if kind == "bytes":
        return Tokenizer(bytes_tokenizer()), "bytes"
    if kind == "bpe":
        return Tokenizer(train_bpe(texts or [], int(arg), progress)), f"bpe:{arg}"
    if kind == "checkpoint":
        return checkpoint_tokenizer(arg), f"checkpoint:{Path(arg).name}"
    return Tokenizer(from_file_with_specials(Path(arg))), f"file:{Path(arg).name}"


def checkpoint_tokenizer(path: str) -> Tokenizer:
    """The tokenizer a checkpoint of `pretrain fit` recorded (every checkpoint carries the one it trained with)."""
    from framework.checkpoint.reader import Checkpoint

    text = Checkpoint(path, exports=False).tokenizer_json
    if not text:
        raise UserError(f"checkpoint '{path}' records no tokenizer; pass the tokenizer.json of its training data")
    return Tokenizer.from_str(text)


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers give every text the same ids: the same vocabulary and special tokens (byte-level
    models with equal vocabularies and merges agree; the comparison covers both through the serialized model)."""
    ma, mb = (json.loads(t.to_str()) for t in (a, b))
    return (ma.get("model") == mb.get("model") and a.hf.get_vocab(with_added_tokens=True)
            == b.hf.get_vocab(with_added_tokens=True))


def parse_spec(spec: str) -> tuple[str, str]:
    """Validate a `--tokenizer` spec early (before any work): ("bytes", ""), ("bpe", "VOCAB") or ("file", PATH)."""
    fix = "use bytes, bpe:VOCAB (e.g. bpe:32000) or the path of a HF tokenizer.json"
    if spec == "bytes":
        return "bytes", ""
    if spec.startswith("bpe:"):
        vocab = spec[4:]
        if not re.fullmatch(r"\d+", vocab):
            raise UserError(f"bad --tokenizer '{spec}': VOCAB must be a whole number; {fix}")
        if int(vocab) < MIN_BPE_VOCAB:
            raise UserError(f"bad --tokenizer '{spec}': a byte-level BPE vocabulary needs at least {MIN_BPE_VOCAB} "
                            f"tokens (256 bytes + {len(SPECIAL_TOKENS)} specials); use e.g. bpe:32000")
        return "bpe", vocab
    path = Path(spec)
    if path.is_dir() and (path / "tokenizer.json").is_file():  # a prepared data dir or a `pretrain export` dir
        return "file", str(path / "tokenizer.json")
    if path.suffix == ".ckpt" or path.is_dir():  # a checkpoint of `pretrain fit`: the tokenizer it trained with
        if not path.exists():
            raise UserError(f"checkpoint '{spec}' does not exist; {fix}, a data directory or a checkpoint")
        return "checkpoint", spec
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise UserError(f"tokenizer file '{spec}' does not exist; {fix}")
        return "file", spec
    raise UserError(f"bad --tokenizer '{spec}'; {fix}")


def bytes_tokenizer() -> HFTokenizer:
    """Byte b -> id b, then the specials: a BPE with the byte alphabet as vocabulary and no merges."""
    to_char = byte_to_unicode()
    hf = HFTokenizer(models.BPE(vocab={to_char[b]: b for b in range(256)}, merges=[]))
    # no regex split: without merges it cannot change the ids, and one piece per document is cheaper
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    _add_specials(hf)
    return hf


def train_bpe(texts: Iterable[str], vocab_size: int, progress: bool = False) -> HFTokenizer:
    """GPT-2 style byte-level BPE trained on `texts`.

    Deterministic: HF counts words exactly and breaks ties between equally frequent pairs by the pair itself,
    so the same texts give the same tokenizer.json whatever the thread count (tested).
    """
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, even ones the corpus lacks
        show_progress=progress,
    )
    hf.train_from_iterator(texts, trainer=trainer)  # a generator is fine: HF pulls batches, memory stays flat
    return hf


def from_file_with_specials(path: Path) -> HFTokenizer:
    """An existing tokenizer.json with our special tokens added where it lacks them."""
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:
        raise UserError(f"cannot load tokenizer '{path}' ({_one_line(e)}); point --tokenizer to a HF "
                        "tokenizer.json") from None
    _add_specials(hf)
    return hf


def _add_specials(hf: HFTokenizer) -> None:
    # normalized=False: matched on raw text, so no normalizer can hide them; HF keeps existing ids for known tokens
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])


def _is_byte_identity(spec: dict) -> bool:
    """True when a tokenizer.json is exactly our `bytes` tokenizer, so utf-8 bytes are its ids."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    to_char = byte_to_unicode()
    return (model.get("type") == "BPE" and not model.get("merges") and spec.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")
            and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
            and model.get("vocab") == {to_char[b]: b for b in range(256)}
            # a non-special added token would be cut out of the text by HF; specials are encoded as text here
            and all(t["id"] >= 256 and t["special"] for t in spec.get("added_tokens", [])))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())
