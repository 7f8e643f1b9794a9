"""Molecule graphs: `pretrain prepare-molecules` molecules/s against a plain RDKit loop, and attribute-masking training
graphs/s of `pretrain fit` against a plain PyTorch loop on the same model and the same batches, alternating.

    python benchmarks/graph_throughput.py                        # gin-cpu, batch 64, RDKit's embedded NCI set
    python benchmarks/graph_throughput.py --preset gin-hu --batch-size 256

prepare: the whole `prepare_molecules` (parse, featurize, split, write shards) against a loop that only parses each
SMILES and walks its atoms and bonds (the least any featurization does). Training: the plain loop trains the same GIN
(AdamW, the masking loss, clipping at 1) on batches collated in advance by the same GraphStream, read from memory;
`pretrain fit` reads them from the shards through the full Lightning stack (datamodule, task, callbacks, logging;
checkpointing and validation off). Timing starts after --warmup steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch


def prepare_rate(out: Path) -> tuple[float, float]:
    """(molecules/s of prepare_molecules, molecules/s of a parse-only RDKit loop) on the embedded NCI set."""
    from rdkit import Chem, RDLogger

    from framework.data.molecules import embedded_path, prepare_molecules

    RDLogger.DisableLog("rdApp.*")
    smiles = [line.split()[0] for line in embedded_path("nci").read_text().splitlines() if line.strip()]
    t = time.perf_counter()
    n = 0
    for s in smiles:
        mol = Chem.MolFromSmiles(s)
        if mol is not None:
            n += sum(1 for _ in mol.GetAtoms()) + sum(1 for _ in mol.GetBonds()) > 0
    plain = len(smiles) / (time.perf_counter() - t)
    t = time.perf_counter()
    prepare_molecules(None, out, embedded="nci", overwrite=True, progress=False)
    return len(smiles) / (time.perf_counter() - t), plain


def batches(data: Path, batch_size: int, count: int) -> list[dict]:
    from framework.data.graphs import GraphDataModule

    dm = GraphDataModule(path=str(data), batch_size=batch_size, mask_rate=0.15, num_workers=0)
    dm.setup("fit")
    stream = dm._stream(dm._train, batch_size, True, True)
    out = []
    while len(out) < count:
        for b in stream:
            b.pop("position")
            out.append(b)
            if len(out) == count:
                break
    return out


def plain_loop(config, data: list[dict], warmup: int) -> tuple[float, float]:
    """(graphs per wall second, graphs per CPU second of this process) after `warmup` steps."""
    from framework.models.gin import GIN
    from framework.objectives.graph import attribute_masking_loss

    torch.manual_seed(0)
    model = GIN(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    graphs = 0
    for i, b in enumerate(data):
        if i == warmup:
            start, cpu = time.perf_counter(), time.process_time()
        out = model(b["x"], b["edge_index"], b["edge_attr"], b["batch"], int(b["y"].shape[0]), b["atom_index"],
                    b["bond_index"])
        loss = attribute_masking_loss(out["atom_logits"], b["atom_targets"], out["bond_logits"],
                                      b["bond_targets"])["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            graphs += int(b["y"].shape[0])
    return graphs / (time.perf_counter() - start), graphs / (time.process_time() - cpu)


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.cpu, self.graphs = warmup, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self.start, self.cpu = time.perf_counter(), time.process_time()
        elif trainer.global_step > self.warmup:
            self.graphs += int(batch["y"].shape[0])

    def on_train_end(self, trainer, pl_module):
        self.end, self.cpu_end = time.perf_counter(), time.process_time()


def framework_fit(data: Path, preset: str, batch_size: int, steps: int, warmup: int, workers: int
                  ) -> tuple[float, float]:
    """(graphs per wall second, graphs per CPU second of this process: the data workers' time is not in it, as the
    plain loop's collation, done in advance, is not in its figure)."""
    from framework.callbacks.guard import Guard
    from framework.data.graphs import GraphDataModule
    from framework.tasks.graph import AttributeMaskingTask

    dm = GraphDataModule(path=str(data), batch_size=batch_size, mask_rate=0.15, num_workers=workers)
    task = AttributeMaskingTask(preset=preset, lr=1e-3, warmup_steps=0)
    timer = _Timer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=warmup + steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer, Guard()])
    trainer.fit(task, datamodule=dm)
    return timer.graphs / (timer.end - timer.start), timer.graphs / (timer.cpu_end - timer.cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gin-cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=1, help="the framework's data workers (the plain loop has none)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from framework.data.graphs import GraphDataModule
    from framework.models.gin import GINConfig

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "nci"
        ours, plain = prepare_rate(data)
        print(f"prepare: {ours:,.0f} molecules/s (parse + featurize + split + shards); a parse-only RDKit loop "
              f"{plain:,.0f} molecules/s ({ours / plain:.2f}x)", flush=True)
        fields = GraphDataModule(path=str(data)).model_fields()
        config = GINConfig.from_preset(args.preset, **fields, masking_head=True)
        data_batches = batches(data, args.batch_size, args.warmup + args.steps)
        pairs = []
        for i in range(args.repeats):  # alternating, so a slow phase of the machine hits both sides
            base = plain_loop(config, data_batches, args.warmup)
            mine = framework_fit(data, args.preset, args.batch_size, args.steps, args.warmup, args.workers)
            pairs.append((base, mine))
            print(f"run {i + 1}: plain {base[0]:,.1f} graphs/s, pretrain fit {mine[0]:,.1f} graphs/s, "
                  f"{mine[0] / base[0]:.3f}x; per CPU second: plain {base[1]:,.1f}, pretrain fit {mine[1]:,.1f}, "
                  f"{mine[1] / base[1]:.3f}x", flush=True)
    print(f"{args.preset}, batch {args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.workers} data workers")
    for k, what in ((0, "graphs/s"), (1, "graphs per CPU second")):
        print(f"median of the per-run ratios, {what}: {statistics.median(m[k] / b[k] for b, m in pairs):.3f}x "
              f"(plain {statistics.median(b[k] for b, _ in pairs):,.1f}, pretrain fit "
              f"{statistics.median(m[k] for _, m in pairs):,.1f})")


if __name__ == "__main__":
    main()
