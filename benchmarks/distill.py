"""Learning check for distillation: a student taught by a pre-trained teacher against the same student from scratch.

    python benchmarks/distill.py gpt    --teacher runs/gpt-smoke/checkpoints/last.ckpt    [--steps 600]
    python benchmarks/distill.py bert   --teacher runs/bert-smoke/checkpoints/last.ckpt   [--steps 1000]
    python benchmarks/distill.py vision --teacher runs/vision-smoke/checkpoints/last.ckpt [--steps 600]

Each objective runs its shipped recipe (configs/distill/{smoke,bert,vision}.yaml) twice with `pretrain fit`, as a
user would: without a teacher (the from-scratch baseline) and with it; same student, seed, data order and steps.
The teacher's own figures are measured on the same val batches by the distilled run (val/teacher_loss,
val/teacher_accuracy). Printed: val task loss (and accuracy) of the three, and the share of the scratch-to-teacher
gap the distilled student closes. Extra arguments go to both fits (e.g. --model.alpha 0.9).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"gpt": "configs/distill/smoke.yaml", "bert": "configs/distill/bert.yaml",
           "vision": "configs/distill/vision.yaml"}


def fit(config: str, out: Path, steps: int, extra: list[str]) -> dict[str, float]:
    """`pretrain fit` of `config` for `steps` (validating at the end); the last validation's val/ metrics."""
    cmd = [sys.executable, "-m", "framework", "fit", "--config", str(ROOT / config), "--trainer.max_steps",
           str(steps), "--trainer.val_check_interval", str(steps), "--trainer.default_root_dir", str(out),
           "--wandb.mode", "disabled", *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        raise SystemExit(f"fit failed ({' '.join(cmd)}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    lines = [line for line in r.stdout.splitlines() if line.startswith("validation at step")]
    if not lines:
        raise SystemExit(f"no validation in the output of {' '.join(cmd)}")
    words = lines[-1].split(": ", 1)[1].split()
    return {k: float(v) for k, v in zip(words[::2], words[1::2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("objective", choices=sorted(RECIPES))
    parser.add_argument("--teacher", required=True, help="the teacher's checkpoint or export")
    parser.add_argument("--steps", type=int, default=None, help="training steps of both students (default: recipe)")
    args, extra = parser.parse_known_args()
    if args.steps is None:
        args.steps = {"gpt": 600, "bert": 1000, "vision": 600}[args.objective]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = fit(RECIPES[args.objective], Path(tmp) / "scratch", args.steps, extra)
        taught = fit(RECIPES[args.objective], Path(tmp) / "taught", args.steps,
                     ["--model.teacher", str(Path(args.teacher).resolve()), *extra])
    rows = [("from scratch", scratch["val/loss"], scratch.get("val/accuracy")),
            ("distilled", taught["val/task_loss"], taught.get("val/accuracy")),
            ("teacher", taught["val/teacher_loss"], taught["val/teacher_accuracy"])]
    print(f"{args.objective}: {args.steps} steps, recipe {RECIPES[args.objective]} {' '.join(extra)}")
    print(f"{'':<14} {'val loss':>9} {'accuracy':>9}")
    for name, loss, acc in rows:
        print(f"{name:<14} {loss:>9.4f} {'' if acc is None else f'{acc:.2%}':>9}")
    gap = scratch["val/loss"] - taught["val/teacher_loss"]
    closed = (scratch["val/loss"] - taught["val/task_loss"]) / gap if gap > 0 else float("nan")
    if gap <= 0:
        print("no gap to close: the teacher's val loss is not below the student's from scratch (train it longer)")
    print(f"the distilled student closes {closed:.0%} of the scratch-to-teacher val-loss gap; "
          f"top-1 agreement with the teacher {taught['val/agreement']:.2%}, val/kl {taught['val/kl']:.4f}")
    if scratch.get("val/accuracy") is not None and taught.get("val/accuracy") is not None:
        # the accuracy gap (what the encoder and image checks are judged on): negative when the student is worse
        acc_gap = taught["val/teacher_accuracy"] - scratch["val/accuracy"]
        acc_closed = (taught["val/accuracy"] - scratch["val/accuracy"]) / acc_gap if acc_gap > 0 else float("nan")
        print(f"accuracy: {taught['val/accuracy'] - scratch['val/accuracy']:+.2%} over scratch, "
              f"{acc_closed:.0%} of the scratch-to-teacher accuracy gap")


if __name__ == "__main__":
    main()
