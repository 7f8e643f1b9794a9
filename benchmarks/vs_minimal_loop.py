"""Whole-job wall time of `pretrain fit` against a minimal hand-written PyTorch loop, on the same configuration.

    python benchmarks/vs_minimal_loop.py                          # nanoGPT's CPU config, 2000 steps, 3 pairs
    python benchmarks/vs_minimal_loop.py --steps 300 --pairs 1    # a quick look
    python benchmarks/vs_minimal_loop.py --size small-cpu         # gpt-small-cpu: 16 x 256
    python benchmarks/vs_minimal_loop.py --size gpt2-124m         # on a GPU (bf16), the same script
    python benchmarks/vs_minimal_loop.py --size overhead --steps 600 --pairs 6   # the per-step extra alone
    python benchmarks/vs_minimal_loop.py --order framework        # the plain loop reads the framework's windows
    python benchmarks/vs_minimal_loop.py --side-by-side --pairs 6 # both jobs at once, one core each (see below)

Sizes: `nanogpt-cpu` is nanoGPT's CPU example (4 layers, 4 heads, 128 wide, T=64, batch 12, char-level, lr 1e-3
with 100 warm-up steps, cosine to 1e-4, betas 0.9/0.99, weight decay 0.1, clip 1.0): the gpt-small-cpu preset at
seq_len 64. `small-cpu` is gpt-small-cpu itself (T=256, batch 16); `gpt2-124m` is for a GPU. `overhead` is the same
model at T=8 and batch 1: a step is then mostly Python, and the framework's per-step extra reads in milliseconds that
the run-to-run noise of a 60 ms step would hide (on these 2 vCPUs, the plain loop's same 2000-step job took from 102
to 132 s in runs minutes apart).

Both sides run as fresh processes, one after the other in alternating pairs, as a user runs them:
- the plain loop (`--plain`, this file): memory-mapped tokens (train.bin, the train shards' token stream), random
  windows drawn with replacement as nanoGPT's `get_batch` does (`--order random`, the default), or with
  `--order framework` the very windows the framework's train loader yields, in its order (one shuffled pass of
  non-overlapping windows per epoch, dumped once to train_windows.bin), so that the two final losses differ by the
  training alone; the framework's model code (framework.models.gpt.GPT), AdamW with decay on matrices only, the same linear
  warm-up + cosine schedule, gradient clipping, then the same final evaluation: the first `--val-batches` batches of
  the val split (the windows the framework's val loader yields, saved to val.bin), a token-weighted mean loss.
- `python -m framework fit` with the same settings, its defaults otherwise (data workers, checkpoints every 1000
  steps and at the end, progress lines, the run summary with its text sample); W&B `--wandb` (default disabled: the
  plain loop logs nothing either). A callback passed with --trainer.callbacks (`Timestamps`, below) records when
  each step starts and ends, checkpoint saves and validation, so the framework's extra time is split into
  start-up, steps, checkpoints, validation and end of run; nothing in the framework is changed for it.

`--side-by-side` runs a pair's two jobs at the same time, each pinned to its own core with one torch thread, and
swaps the cores every pair. On a shared machine whose speed drifts by more than the difference under test (these
vCPUs: up to 30% over minutes), both jobs then see the same drift, and an even number of pairs cancels a difference
between the two cores. It measures the framework's extra at one thread a side, not at torch's default threads.

The corpus: a few packages of the running Python's standard library (about 3 MB of source), bytes tokenizer, 10%
held out for validation, prepared once into a temp dir.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

SIZES = {
    "nanogpt-cpu": dict(preset="gpt-small-cpu", seq_len=64, batch=12, lr=1e-3, warmup=100, betas=(0.9, 0.99)),
    "small-cpu": dict(preset="gpt-small-cpu", seq_len=256, batch=16, lr=1e-3, warmup=100, betas=(0.9, 0.99)),
    "overhead": dict(preset="gpt-small-cpu", seq_len=8, batch=1, lr=1e-3, warmup=100, betas=(0.9, 0.99)),
    "gpt2-124m": dict(preset="gpt2-124m", seq_len=1024, batch=16, lr=6e-4, warmup=100, betas=(0.9, 0.95)),
}
MIN_LR_RATIO, WEIGHT_DECAY, CLIP, SEED = 0.1, 0.1, 1.0, 1234
CORPUS = ("email", "json", "asyncio", "http", "xml", "logging", "unittest")


def lr_at(step: int, lr: float, warmup: int, max_steps: int) -> float:
    """Linear warm-up, then cosine decay to lr * MIN_LR_RATIO at max_steps (the framework's schedule)."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    floor = lr * MIN_LR_RATIO
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- the plain loop (a process of its own)
def plain(spec: dict) -> None:
    """nanoGPT's train.py, reduced to what both sides do; writes its timestamps to spec["out"]."""
    import numpy as np
    import torch

    from framework.models.gpt import GPT, GPTConfig
    from framework.objectives.causal_lm import causal_lm_loss

    marks = {"imported": time.time()}
    device = torch.device(spec["device"])
    bf16 = device.type == "cuda"
    T, B, steps = spec["seq_len"], spec["batch"], spec["steps"]
    train = np.memmap(spec["train_bin"], dtype=np.uint16, mode="r")
    ordered = spec.get("order") == "framework"
    if ordered:  # the framework's windows, batch after batch
        train = train.reshape(-1, T + 1)
    val = np.fromfile(spec["val_bin"], dtype=np.uint16).reshape(-1, T + 1)
    torch.manual_seed(SEED)
    config = GPTConfig.from_preset(spec["preset"], seq_len=T, vocab_size=spec["vocab_size"])
    model = GPT(config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=spec["lr"], betas=tuple(spec["betas"]), eps=1e-8, fused=device.type == "cuda" or None)
    g = torch.Generator().manual_seed(SEED)
    marks["first_step"] = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, spec["lr"], spec["warmup"], steps)
        if ordered:
            x = torch.from_numpy(train[step * B:(step + 1) * B].astype(np.int64)).to(device)
        else:
            ix = torch.randint(len(train) - T - 1, (B,), generator=g).tolist()
            x = torch.from_numpy(np.stack([train[i:i + T + 1] for i in ix]).astype(np.int64)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = causal_lm_loss(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    marks["loop_end"] = time.time()
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i in range(0, len(val), B):
            v = torch.from_numpy(val[i:i + B].astype(np.int64)).to(device)
            total += float(causal_lm_loss(model(v[:, :-1]), v[:, 1:])) * v[:, 1:].numel()
            count += v[:, 1:].numel()
    marks["eval_end"] = time.time()
    marks["val_loss"] = total / count
    Path(spec["out"]).write_text(json.dumps(marks))


# ---------------------------------------------------------------- the framework's timestamps
try:
    import lightning as _L

    class Timestamps(_L.Callback):
        """Wall-clock times (time.time) of the fit's events, written as JSON to `path` at teardown: each step's start
        and end, each checkpoint save, validation start and end, train end. Callbacks from the config run after the
        framework's own ones, except checkpointing, which Lightning runs last: a save falls between a step's end
        here and the next event."""

        def __init__(self, path: str) -> None:
            self.path, self.events = path, []

        def setup(self, trainer, pl_module, stage) -> None:
            self.events.append(("setup", time.time()))

        def on_train_start(self, trainer, pl_module) -> None:
            self.events.append(("train_start", time.time()))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.events.append(("batch_start", time.time()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.events.append(("batch_end", time.time()))

        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            self.events.append(("save", time.time()))

        def on_validation_start(self, trainer, pl_module) -> None:
            self.events.append(("val_start", time.time()))

        def on_validation_end(self, trainer, pl_module) -> None:
            self.events.append(("val_end", time.time()))

        def on_train_end(self, trainer, pl_module) -> None:
            self.events.append(("train_end", time.time()))

        def teardown(self, trainer, pl_module, stage) -> None:
            self.events.append(("teardown", time.time()))
            Path(self.path).write_text(json.dumps(self.events))
except ImportError:  # the parent process needs none of this
    pass


def framework_breakdown(events: list, launch: float, exit_: float) -> dict[str, float]:
    """Seconds of the fit's phases from its timestamps: start-up (launch to the first step's start), steps (first
    step's start to the last step's end, without the checkpoint saves), checkpoints (each save's gap over the median
    gap between steps), validation, end (validation's end, or the last step's, to the process's exit)."""
    starts = [t for name, t in events if name == "batch_start"]
    ends = [t for name, t in events if name == "batch_end"]
    gaps = [b - a for a, b in zip(ends, starts[1:])]
    typical = statistics.median(gaps) if gaps else 0.0
    inner = final = 0.0  # saves between steps; the final save, after the last step
    for s in (t for name, t in events if name == "save"):
        if s > ends[-1]:
            final = min(t for name, t in events if t > s and name in ("val_start", "train_end", "teardown")) - ends[-1]
        else:
            i = max(j for j, e in enumerate(ends) if e <= s)
            if i + 1 < len(starts):
                inner += starts[i + 1] - ends[i] - typical
    val = [(a, b) for (na, a), (nb, b) in zip(events, events[1:]) if na == "val_start" and nb == "val_end"]
    last = max(val[-1][1] if val else 0.0, ends[-1] + final)
    return {"startup": starts[0] - launch, "steps": ends[-1] - starts[0] - inner, "checkpoint": inner + final,
            "validation": sum(b - a for a, b in val), "end": exit_ - last, "n_steps": len(starts)}


def run_framework(args: argparse.Namespace, size: dict, work: Path, vocab: int, i: int, env: dict,
                  src: str | None = None, core: int | None = None) -> Job:
    """One `pretrain fit` (of this checkout, or of the framework at `src`), started; its result has its phases."""
    marks = work / f"fit{i}.json"
    if src is not None:
        env = {**env, "PYTHONPATH": os.pathsep.join([src, str(ROOT / "benchmarks")])}
    config = {
        "seed_everything": SEED,
        "model": {"class_path": "framework.tasks.causal_lm.CausalLMTask",
                  "init_args": {"preset": size["preset"], "config": {"seq_len": size["seq_len"]}, "lr": size["lr"],
                                "min_lr_ratio": MIN_LR_RATIO, "warmup_steps": size["warmup"],
                                "weight_decay": WEIGHT_DECAY, "betas": list(size["betas"]), "grad_clip": CLIP}},
        "data": {"path": str(work / "shards"), "seq_len": size["seq_len"], "batch_size": size["batch"]},
        "trainer": {"default_root_dir": str(work / f"run{i}"), "devices": 1, "max_steps": args.steps,
                    "val_check_interval": args.steps, "check_val_every_n_epoch": None,
                    "limit_val_batches": args.val_batches,
                    "callbacks": [{"class_path": "vs_minimal_loop.Timestamps", "init_args": {"path": str(marks)}}]},
        "wandb": {"mode": args.wandb},
    }
    if args.workers is not None:
        config["data"]["num_workers"] = args.workers
    (work / f"fit{i}_config.json").write_text(json.dumps(config))
    cmd = [sys.executable, "-m", "framework", "fit", "--config", str(work / f"fit{i}_config.json"), *args.fit_args]

    def result(job: Job) -> dict:
        out_text = job.output()
        if job.returncode:
            raise SystemExit(f"pretrain fit failed:\n{out_text[-6000:]}")
        val = re.findall(r"val/loss:?\s+([0-9.]+)", out_text)
        out = framework_breakdown(json.loads(marks.read_text()), job.launch, job.exit)
        out.update(wall=job.exit - job.launch, cpu=job.cpu, val_loss=float(val[-1]) if val else float("nan"))
        return out

    return Job(cmd, env, work, f"fit{i}", core, result)


def run_plain(args: argparse.Namespace, size: dict, work: Path, vocab: int, device: str, env: dict,
              core: int | None = None) -> Job:
    train = "train_windows.bin" if args.order == "framework" else "train.bin"
    spec = {**size, "steps": args.steps, "vocab_size": vocab, "device": device, "train_bin": str(work / train),
            "val_bin": str(work / "val.bin"), "out": str(work / "plain.json"), "order": args.order}
    (work / "plain_spec.json").write_text(json.dumps(spec))

    def result(job: Job) -> dict:
        if job.returncode:
            raise SystemExit(f"the plain loop failed:\n{job.output()[-6000:]}")
        m = json.loads((work / "plain.json").read_text())
        return {"wall": job.exit - job.launch, "cpu": job.cpu, "val_loss": m["val_loss"],
                "startup": m["first_step"] - job.launch, "steps": m["loop_end"] - m["first_step"], "checkpoint": 0.0,
                "validation": m["eval_end"] - m["loop_end"], "end": job.exit - m["eval_end"]}

    return Job([sys.executable, __file__, "--plain", str(work / "plain_spec.json")], env, work, "plain", core, result)


class Job:
    """One benchmark process, started at once (pinned to `core` when given); `wait_all` collects jobs as they exit,
    each with its own exit time and CPU time (user + system of the process and the children it waited for)."""

    def __init__(self, cmd: list[str], env: dict, work: Path, name: str, core: int | None, result: Any) -> None:
        self.log, self.result = work / f"{name}.log", result
        pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
        with open(self.log, "w") as log:
            self.launch = time.time()
            self.proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=pin)
        self.exit, self.cpu, self.returncode = 0.0, 0.0, None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @staticmethod
    def wait_all(*jobs: "Job") -> list[dict]:
        running = {job.proc.pid: job for job in jobs}
        while running:
            pid, status, usage = os.wait4(-1, 0)
            job = running.pop(pid, None)
            if job is None:
                continue
            job.exit, job.cpu = time.time(), usage.ru_utime + usage.ru_stime
            job.returncode = job.proc.returncode = os.waitstatus_to_exitcode(status)
        return [job.result(job) for job in jobs]


def prepare_data(work: Path, size: dict, val_batches: int, train_batches: int = 0) -> int:
    """Shards of the corpus, train.bin (the train shards' token stream, EODs included), val.bin (the first
    `val_batches` batches of windows the framework's val loader yields) and, when train_batches > 0,
    train_windows.bin (the first `train_batches` batches of the framework's train loader, epoch after epoch, in its
    order: the order is global, the same for any number of workers). Returns the vocabulary size."""
    import numpy as np

    from framework.data.datamodule import ShardDataModule
    from framework.data.prepare import prepare
    from framework.data.shards import LocalShard

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prepare([str(stdlib / p) for p in CORPUS], work / "shards", tokenizer="bytes", val_fraction=0.1, progress=False)
    dm = ShardDataModule(path=str(work / "shards"), seq_len=size["seq_len"], batch_size=size["batch"],
                         num_workers=0)
    dm.setup("fit")
    eod = dm.special_ids["eod"]
    with open(work / "train.bin", "wb") as f:
        for shard in dm._train:
            reader = LocalShard(shard)
            out = np.empty(shard.tokens + shard.samples, dtype=reader.dtype)
            reader.read(0, out, eod)
            reader.close()
            f.write(out.astype(np.uint16).tobytes())
    stream = dm._stream(dm._val, dm.val_batch_size, shuffle=False, train=False)
    windows = []
    for batch in stream:
        windows.append(batch["tokens"].numpy())
        if len(windows) == val_batches:
            break
    np.concatenate(windows).astype(np.uint16).tofile(work / "val.bin")
    if train_batches:
        stream, windows = dm._stream(dm._train, size["batch"], shuffle=True, train=True), []
        for epoch in itertools.count():
            stream.segment = stream.fresh_segment(epoch)
            windows += [batch["tokens"].numpy() for batch in itertools.islice(stream, train_batches - len(windows))]
            if len(windows) == train_batches:
                break
        np.concatenate(windows).astype(np.uint16).tofile(work / "train_windows.bin")
    assert dm.vocab_size < 65536
    return dm.vocab_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="nanogpt-cpu")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--pairs", type=int, default=3, help="alternating pairs (plain loop, then pretrain fit)")
    p.add_argument("--val-batches", type=int, default=20, help="batches of the final evaluation (nanoGPT: 20)")
    p.add_argument("--workers", type=int, help="the framework's data.num_workers (default: its own default)")
    p.add_argument("--wandb", default="disabled", choices=["disabled", "offline", "auto"])
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both sides (on a loaded machine, 1: torch's "
                   "threads spin-wait, and 2 threads on 2 busy cores ran this model's steps 9x slower than 1)")
    p.add_argument("--compare-src", metavar="DIR", help="also run `pretrain fit` from this source tree in every pair "
                   "(e.g. `git archive` of an earlier commit): before/after figures from one alternating run")
    p.add_argument("--order", choices=["random", "framework"], default="random",
                   help="the plain loop's windows: random with replacement (nanoGPT's get_batch), or the framework's")
    p.add_argument("--side-by-side", action="store_true",
                   help="run each pair's two jobs at the same time, each pinned to one core with one torch thread, "
                   "swapping cores every pair: both see the same drift of a shared machine's speed (needs 2 cores)")
    p.add_argument("--plain", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("fit_args", nargs="*", help="extra `pretrain fit` arguments (after --)")
    args = p.parse_args()
    if args.plain:
        return plain(json.loads(Path(args.plain).read_text()))
    import torch

    size = SIZES[args.size]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    if args.side_by_side:
        if args.compare_src or len(os.sched_getaffinity(0)) < 2 or device != "cpu":
            raise SystemExit("--side-by-side needs 2 CPU cores, a CPU run and no --compare-src")
        args.threads = 1
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        vocab = prepare_data(work, size, args.val_batches, args.steps if args.order == "framework" else 0)
        for i in range(args.pairs):
            other = None
            if args.side_by_side:  # both at once, one core each; they swap cores every pair
                base, ours = Job.wait_all(run_plain(args, size, work, vocab, device, env, core=i % 2),
                                          run_framework(args, size, work, vocab, i, env, core=1 - i % 2))
            else:
                (base,) = Job.wait_all(run_plain(args, size, work, vocab, device, env))
                if args.compare_src and i % 2 == 0:  # the two fits take turns at going first
                    (other,) = Job.wait_all(run_framework(args, size, work, vocab, i, env, args.compare_src))
                (ours,) = Job.wait_all(run_framework(args, size, work, vocab, i, env))
                if args.compare_src and i % 2 == 1:
                    (other,) = Job.wait_all(run_framework(args, size, work, vocab, i, env, args.compare_src))
            rows.append((base, ours) if other is None else (base, ours, other))
            line = (f"pair {i + 1}: plain {base['wall']:.2f} s (val {base['val_loss']:.4f}), pretrain fit "
                    f"{ours['wall']:.2f} s (val {ours['val_loss']:.4f}), {ours['wall'] / base['wall']:.3f}x")
            if other is not None:
                line += (f"; --compare-src fit {other['wall']:.2f} s (val {other['val_loss']:.4f}), "
                         f"{other['wall'] / base['wall']:.3f}x")
            print(line, flush=True)
    print(f"{args.size}: {size['preset']} at batch {size['batch']} x {size['seq_len']}, {args.steps} steps, "
          f"{args.val_batches} val batches, device {device}, torch {torch.__version__}, {os.cpu_count()} CPU(s), "
          f"W&B {args.wandb}, framework data workers: {'default' if args.workers is None else args.workers}, "
          f"threads: {args.threads or 'default'}, plain loop's windows: {args.order}, "
          f"{'side by side (one core each)' if args.side_by_side else 'one after the other'}")
    report([(r[0], r[1]) for r in rows], args.steps, "pretrain fit")
    if args.compare_src:
        print(f"--- pretrain fit from {args.compare_src}:")
        report([(r[0], r[2]) for r in rows], args.steps, "compared fit")


def report(rows: list, steps: int, name: str) -> None:
    """Medians over the pairs: wall times, their ratio, val losses, and the phases."""
    med = {side: {k: statistics.median(r[j][k] for r in rows) for k in rows[0][j] if k != "n_steps"}
           for j, side in enumerate(("plain", "fit"))}
    ratios = [o["wall"] / b["wall"] for b, o in rows]
    print(f"median of {len(rows)} pairs: plain {med['plain']['wall']:.2f} s, {name} {med['fit']['wall']:.2f} s; "
          f"median ratio {statistics.median(ratios):.3f}x (pairs: {', '.join(f'{r:.3f}' for r in ratios)})")
    cpu = [o["cpu"] / b["cpu"] for b, o in rows]
    print(f"CPU time (user + system, whole job): plain {med['plain']['cpu']:.2f} s, {name} {med['fit']['cpu']:.2f} "
          f"s; median ratio {statistics.median(cpu):.3f}x (pairs: {', '.join(f'{r:.3f}' for r in cpu)})")
    print(f"final val loss: plain {med['plain']['val_loss']:.4f}, {name} {med['fit']['val_loss']:.4f} "
          f"({med['fit']['val_loss'] - med['plain']['val_loss']:+.4f} nats)")
    print(f"{'phase (median s)':<22}{'plain':>9}{'fit':>9}{'extra':>9}")
    for k in ("startup", "steps", "checkpoint", "validation", "end", "wall"):
        extra = statistics.median(o[k] - b[k] for b, o in rows)
        print(f"{k:<22}{med['plain'][k]:9.2f}{med['fit'][k]:9.2f}{extra:+9.2f}")
    per_step = statistics.median((o["steps"] - b["steps"]) / steps * 1000 for b, o in rows)
    print(f"per step: plain {1000 * med['plain']['steps'] / steps:.2f} ms, {name} "
          f"{1000 * med['fit']['steps'] / steps:.2f} ms, extra {per_step:+.2f} ms")


if __name__ == "__main__":
    main()
