"""Documents -> little-endian token bytes, in input order, by one process or a pool of `workers` processes.

The output order is the input order whatever the worker count, so the shards a prepare writes from it are
byte-identical for any --workers.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from framework.data.inputs import Doc
from framework.data.tokenizer import Tokenizer

BATCH_BYTES = 1 << 20  # text per tokenization task: large enough to amortise IPC, small enough to keep memory flat
BATCH_DOCS = 1000  # ...and documents per task, so a corpus of short lines still spreads over the workers

_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode_in_worker(texts: list[str]) -> list[bytes]:
    assert _WORKER_TOKENIZER is not None
    return _encode(_WORKER_TOKENIZER, texts)


def _encode(tok: Tokenizer, texts: list[str]) -> list[bytes]:
    return [tok.encode_array(t).tobytes() for t in texts]


def _batches(docs: Iterable[Doc]) -> Iterator[list[Doc]]:
    batch: list[Doc] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize(docs: Iterable[Doc], tok: Tokenizer, workers: int) -> Iterator[tuple[Doc, bytes]]:
    """(document, little-endian token bytes) in input order, tokenized by `workers` processes.

    The bytes tokenizer always runs in-process: it is a memory copy, and shipping text to workers and tokens back
    made it slower (stdlib corpus, 2 cores: 96 MB/s in-process, 54 MB/s with 2 workers).
    """
    if workers <= 1 or tok.is_bytes:
        for batch in _batches(docs):
            yield from zip(batch, _encode(tok, [d.text for d in batch]), strict=True)
        return
    # spawn, not fork: a parent that has trained a BPE holds HF's thread pool, which fork does not survive cleanly.
    # ProcessPoolExecutor, not Pool: a worker killed (e.g. by the OOM killer) fails the run instead of hanging it.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(tok.to_str(),)) as pool:
        # At most 2 batches per worker in flight, so memory stays bounded however large the corpus (Pool.imap's
        # feeder would read ahead without limit). Results are taken in submission order: deterministic.
        pending: deque[tuple[list[Doc], Future]] = deque()
        for batch in _batches(docs):
            pending.append((batch, pool.submit(_encode_in_worker, [d.text for d in batch])))
            if len(pending) >= 2 * workers:
                yield from _results(*pending.popleft())
        while pending:
            yield from _results(*pending.popleft())


def _results(batch: list[Doc], future: Future) -> Iterator[tuple[Doc, bytes]]:
    try:
        return zip(batch, future.result(), strict=True)
    except BrokenProcessPool:
        raise RuntimeError("a tokenizer worker process died: out of memory, or the calling script lacks "
                           "`if __name__ == '__main__':` (needed to start workers); try --workers 1") from None

