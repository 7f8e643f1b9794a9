"""One rank of a data-pipeline test: `python data_worker.py JSON_ARGS`, launched once per rank by the test.

Initialises gloo from MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE, reads batches through ShardDataModule's real
DataLoader (with worker processes), feeds each one through the datamodule's batch hook as training would, checks that
all ranks got the same number of batches, and saves what it saw.
"""

import glob
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from framework.data.datamodule import ShardDataModule


def main(args: dict) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # "pipe": the same shards through `pipe:cat`, a stream that cannot seek, with the manifest found beside them
    shards = sorted(glob.glob(os.path.join(args["path"], "train-*.tar"))) if args.get("pipe") else None
    dm = ShardDataModule(path="" if shards else args["path"], seq_len=args["seq_len"], batch_size=args["batch_size"],
                         num_workers=args["workers"], seed=7, shuffle_block=args.get("shuffle_block", 5),
                         train_shards=[f"pipe:cat {s}" for s in shards] if shards else None)
    dm.setup("fit")
    if args.get("load"):
        with open(args["load"]) as f:
            dm.load_state_dict(json.load(f))
    loader = dm.train_dataloader()
    seen = []
    for _ in range(args.get("epochs", 1)):
        for i, batch in enumerate(loader):
            if args.get("stop") is not None and i == args["stop"]:
                break
            batch = dm.on_before_batch_transfer(batch, 0)
            seen.append(batch["tokens"].numpy())
    counts = torch.tensor([len(seen)])
    gathered = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts)
    if len({int(c) for c in gathered}) != 1:
        raise SystemExit(f"ranks disagree on the number of batches: {[int(c) for c in gathered]}")
    np.save(os.path.join(args["out"], f"rank{rank}.npy"),
            np.concatenate(seen) if seen else np.zeros((0, args["seq_len"] + 1), dtype=np.int64))
    if rank == 0:
        with open(os.path.join(args["out"], "state.json"), "w") as f:
            json.dump(dm.state_dict(), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
