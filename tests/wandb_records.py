"""What a W&B run logged, read back from its offline `run-ID.wandb` file: W&B's copy of the LevelDB log format
(a 7-byte header, then 32 KiB blocks of records, each with a 7-byte header: CRC, length, type; a record that does
not fit a block is split into FIRST/MIDDLE/LAST pieces), holding wandb_internal_pb2.Record messages."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:  # zero padding at the end
            pos += left
            continue
        body = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        pending = body if kind in (FULL, FIRST) else pending + body
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """records() once the run's `exit` record is in the file. W&B's service process writes the file: `wandb.finish()`
    (and the fit with it) can return before the service has written the last records, by seconds on a loaded
    machine. After `timeout` s, what the file holds (the caller's assertions then show what is missing)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        out = records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in out) or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def history(path: Path) -> list[dict]:
    """The logged rows of a finished run, in order: key -> value (JSON-decoded)."""
    rows = []
    for r in finished_records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def config_keys(path: Path) -> set[str]:
    return {i.key or "/".join(i.nested_key) for r in finished_records(path) if r.WhichOneof("record_type") == "config"
            for i in r.config.update}
