"""A tiny LightningModule + dataset for the strategy tests, and a script that fits it and dumps what each rank saw.

    python tests/_toy.py --strategy ddp --devices 2 --micro-batch 2 --out DIR

Lightning's launcher re-runs this same command line once per extra rank (LOCAL_RANK set), so it must be a plain
script. Each rank writes DIR/rank{R}.pt: the global (all-rank mean) loss of every micro-batch and the full parameters
after training (FSDP2 DTensor shards and ZeRO-3 partitions gathered).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `framework`

N_SAMPLES, SEQ, DIM, CLASSES = 24, 4, 16, 5


class ToyBlock(nn.Module):
    """Pre-norm residual MLP: the unit FSDP2 shards and activation checkpointing wraps."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ToyNet(nn.Module):
    def __init__(self, dim: int = DIM, n_blocks: int = 2, classes: int = CLASSES) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(n_blocks))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, C)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=1))


def toy_dataset(seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, SEQ, DIM, generator=g)
    y = torch.randint(0, CLASSES, (N_SAMPLES,), generator=g)
    return TensorDataset(x, y)


def make_toy_task(micro_batch_size: int, lr: float = 3e-2, activation_checkpointing: bool = False):
    import lightning as L

    from framework.distributed import parallelize

    class ToyTask(L.LightningModule):
        """Thin task: batch -> net -> loss. `configure_model` is where FSDP2 sharding (and checkpointing) happen."""

        def __init__(self) -> None:
            super().__init__()
            self.net: ToyNet | None = None
            self.global_losses: list[float] = []
            self.full_params: dict[str, torch.Tensor] = {}

        def configure_model(self) -> None:
            # Built here, not in __init__: Lightning runs this hook inside the strategy's init context, so under
            # ZeRO-3 (deepspeed.zero.Init) the parameters are partitioned as they are created, as a large model needs.
            if self.net is None:
                torch.manual_seed(0)  # the same initial weights on every rank and in the 1-process reference
                self.net = ToyNet()
            parallelize(self.net, self.trainer.strategy, (ToyBlock,), activation_checkpointing=activation_checkpointing)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            # mean over ranks = the loss of the whole global micro-batch (ranks hold equal-sized slices)
            self.global_losses.append(self.trainer.strategy.reduce(loss.detach().clone(), reduce_op="mean").item())
            return loss

        def train_dataloader(self) -> DataLoader:
            # Rank r takes samples r, r+W, ... in order (no shuffle), so the W ranks' micro-batch k together hold
            # exactly the samples of the 1-process micro-batch k of size W * micro_batch_size.
            # (Lightning's own DistributedSampler would shuffle: it always does for training.)
            ds = toy_dataset()
            sampler = DistributedSampler(ds, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False)
            return DataLoader(ds, batch_size=micro_batch_size, sampler=sampler)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.1)

        def on_train_end(self) -> None:
            # collectives: every rank runs this
            self.full_params = gather_full_params(self.net)

    return ToyTask()


def gather_full_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters on every rank: FSDP2 DTensors and DeepSpeed ZeRO-3 partitions are gathered."""
    from torch.distributed.tensor import DTensor

    params = dict(module.named_parameters())
    if any(hasattr(p, "ds_id") for p in params.values()):  # ZeRO-3 partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in params.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, required=True)
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--clip", type=float, default=None)
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--offload-params", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import lightning as L

    from framework.distributed import make_strategy

    t0 = time.perf_counter()
    task = make_toy_task(args.micro_batch, activation_checkpointing=args.activation_checkpointing)
    strategy = make_strategy(
        args.strategy,
        precision="32-true",
        accelerator="cpu",
        micro_batch_size=args.micro_batch,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
        offload_params=args.offload_params,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        precision="32-true",
        max_steps=args.max_steps,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=args.clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the task slices the data itself, as the framework's data module does
    )
    trainer.fit(task)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "losses": task.global_losses,
            "params": task.full_params,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "seconds": time.perf_counter() - t0,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
