"""Kill -9 chaos: SIGKILL a 2-rank CPU `pretrain fit` at random moments, resume it with --ckpt_path last each time,
and check that its final weights equal an uninterrupted run's, bit for bit.

    python benchmarks/chaos.py [--strategies ddp,fsdp,deepspeed_stage_2] [--kills 5] [--steps 24] [--seed 0]

For each strategy: one uninterrupted run; then the same run started again and again, each attempt killed (the whole
process group, as a lost node or the OOM killer would) at a random moment once it has written its first checkpoint,
until `--kills` kills have landed; then one last attempt runs to the end. Checkpoints are written every 2 steps, so
many kills land inside a checkpoint write (a single file under ddp, a directory of per-rank shards under fsdp and
DeepSpeed). fp32, dropout on (so the RNG streams must be restored too), one data worker per rank, W&B offline.
Prints one row per strategy: kills, where they landed (the newest checkpoint's step at each kill), total steps
trained (repeats included), and whether the final weights are bit-equal. Exit code 1 if any are not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from framework.checkpoint.reader import checkpoint_meta, load_state_dict  # noqa: E402
from framework.data.prepare import prepare  # noqa: E402

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
         "phi chi psi omega").split()


def make_shards(root: Path) -> Path:
    rng = random.Random(0)
    src = root / "corpus"
    src.mkdir()
    for i in range(24):
        (src / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(WORDS) + str(rng.randrange(100))
                                                      for _ in range(80)) + "\n")
    out = root / "data"
    prepare([str(src)], out, tokenizer="bytes", val_fraction=0.0, seed=0, progress=False)
    return out


def write_config(run: Path, shards: Path, strategy: str, steps: int) -> Path:
    config = {
        "seed_everything": 7,
        "model": {"class_path": "framework.tasks.causal_lm.CausalLMTask",
                  "init_args": {"preset": "gpt-tiny", "config": {"dropout": 0.1}, "lr": 3e-3, "warmup_steps": 2}},
        "data": {"path": str(shards), "seq_len": 32, "batch_size": 4, "num_workers": 1, "shuffle_block": 16},
        "trainer": {"default_root_dir": str(run), "accelerator": "cpu", "devices": 2, "strategy": strategy,
                    "max_steps": steps, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "limit_val_batches": 0},
        "checkpoint": {"every_n_steps": 2, "keep": 2},
        "summary": {"sample_tokens": 0, "baseline": False},
        "wandb": {"mode": "offline"},
    }
    path = run.parent / f"{run.name}.json"
    path.write_text(json.dumps(config))
    return path


def env() -> dict[str, str]:
    drop = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "WANDB_SERVICE")
    out = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    out.update(WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    return out


def start(config: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "framework", "fit", "--config", str(config), *(["--ckpt_path", "last"] if resume
                                                                                 else [])]
    return subprocess.Popen(cmd, cwd=config.parent, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # its own process group: the kill takes every rank


def newest_step(ckpts: Path) -> int:
    steps = [int(p.name[4:11]) for p in ckpts.glob("step*.ckpt") if p.name[4:11].isdigit()]
    return max(steps, default=0)


def chaos(strategy: str, kills: int, steps: int, rng: random.Random, work: Path) -> dict:
    shards = work / "data" if (work / "data").exists() else make_shards(work)
    straight = work / f"{strategy}-straight"
    t0 = time.perf_counter()
    p = start(write_config(straight, shards, strategy, steps), resume=False)
    out, _ = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"the uninterrupted {strategy} run failed:\n{out[-3000:]}")
    duration = time.perf_counter() - t0
    # how long its training took, from the first checkpoint (step 2) to the last one (start-up is not a target)
    times = sorted(p.stat().st_mtime for p in (straight / "checkpoints").glob("step*.ckpt"))
    train = max(0.5, os.path.getmtime(straight / "checkpoints" / "last.ckpt") - times[0]) if times else duration

    run = work / f"{strategy}-chaos"
    config = write_config(run, shards, strategy, steps)
    ckpts = run / "checkpoints"
    landed: list[int] = []
    attempts = 0
    while len(landed) < kills:
        p = start(config, resume=attempts > 0)
        attempts += 1
        first = newest_step(ckpts)
        while p.poll() is None and newest_step(ckpts) <= first:  # wait until this attempt has made progress
            time.sleep(0.05)
        time.sleep(rng.uniform(0, train * (steps - newest_step(ckpts)) / steps))
        if p.poll() is not None:  # it ended before the kill: complete, or failed (a finding)
            out = p.stdout.read() if p.stdout else ""
            if p.returncode != 0:
                raise SystemExit(f"attempt {attempts} of the {strategy} chaos run failed:\n{out[-3000:]}")
            break
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        landed.append(newest_step(ckpts))
    p = start(config, resume=True)
    out, _ = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"the last resume of the {strategy} chaos run failed:\n{out[-3000:]}")

    a = load_state_dict(straight / "checkpoints" / "last.ckpt")
    b = load_state_dict(ckpts / "last.ckpt")
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = checkpoint_meta(ckpts / "last.ckpt")
    return {"strategy": strategy, "kills": len(landed), "newest checkpoint at each kill": landed,
            "attempts": attempts + 1, "final step": meta["global_step"], "bit-equal": equal,
            "uninterrupted s": round(duration, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default="ddp,fsdp,deepspeed_stage_2")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for strategy in args.strategies.split(","):
            rows.append(chaos(strategy, args.kills, args.steps, rng, work))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'strategy':<20} {'kills':>5}  {'newest checkpoint at each kill':<32} {'final step':>10}  bit-equal")
    for r in rows:
        print(f"{r['strategy']:<20} {r['kills']:>5}  {str(r['newest checkpoint at each kill']):<32} "
              f"{r['final step']:>10}  {r['bit-equal']}")
    return 0 if all(r["bit-equal"] and r["final step"] == args.steps for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
