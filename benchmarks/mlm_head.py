"""Masked-LM step time with the vocabulary projection on the masked positions only (gathered first) vs on every
position (the naive way: full logits, loss masked afterwards), measured in one run on the same model and batch.

    python benchmarks/mlm_head.py                                  # CPU: bert-mini, 30,528-token vocabulary
    python benchmarks/mlm_head.py --preset bert-base --batch-size 32 --device cuda

Both variants compute the same loss (checked); FLOPs per step come from the model's own count.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from framework.models import Encoder, EncoderConfig
from framework.objectives.causal_lm import IGNORE_INDEX
from framework.objectives.masked_lm import mask_tokens, masked_lm_loss


def step_time(model: Encoder, inputs: torch.Tensor, labels: torch.Tensor, gathered: bool, steps: int,
              warmup: int) -> tuple[float, float]:
    """(seconds per forward + backward, loss)."""
    predict = labels != IGNORE_INDEX
    loss = torch.zeros(())
    for i in range(warmup + steps):
        if i == warmup:
            if inputs.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if gathered:
            loss = masked_lm_loss(model(inputs, predict=predict), labels[predict])
        else:
            logits = model(inputs)  # (B, T, V) for every position
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
    if inputs.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, float(loss.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bert-mini")
    p.add_argument("--vocab-size", type=int, default=30528)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    config = EncoderConfig.from_preset(args.preset, vocab_size=args.vocab_size, seq_len=args.seq_len)
    model = Encoder(config).to(args.device)
    specials = list(range(args.vocab_size - 5, args.vocab_size))
    tokens = torch.randint(0, args.vocab_size - 5, (args.batch_size, args.seq_len))
    print(f"{args.preset}, vocab {args.vocab_size}, batch {args.batch_size} x {args.seq_len}, {args.device}, "
          f"torch {torch.__version__}")
    print(f"{'mask rate':>9}  {'full logits':>12}  {'gathered':>10}  {'speed-up':>8}  {'FLOPs ratio':>11}")
    for rate in (0.15, 0.3):
        inputs, labels = mask_tokens(tokens, rate=rate, mask_id=specials[2], special_ids=specials,
                                     vocab_size=args.vocab_size, seed=0, epoch=0,
                                     sample_ids=list(range(args.batch_size)))
        inputs, labels = inputs.to(args.device), labels.to(args.device)
        full, loss_full = step_time(model, inputs, labels, False, args.steps, args.warmup)
        gathered, loss_gathered = step_time(model, inputs, labels, True, args.steps, args.warmup)
        assert abs(loss_full - loss_gathered) < 1e-3 * max(1.0, abs(loss_full)), (loss_full, loss_gathered)
        B, T = labels.shape
        predicted = int((labels != IGNORE_INDEX).sum())
        flops_ratio = model.flops(B, T, B * T) / model.flops(B, T, predicted)
        print(f"{rate:>9.0%}  {full * 1e3:>9.1f} ms  {gathered * 1e3:>7.1f} ms  {full / gathered:>7.2f}x  "
              f"{flops_ratio:>10.2f}x")


if __name__ == "__main__":
    main()
