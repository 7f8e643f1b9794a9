"""Training tokens/s (and MFU on known GPUs) of `pretrain fit` against a plain PyTorch loop, measured in one run.

    python benchmarks/train_throughput.py                                   # CPU: gpt-small-cpu, fp32
    python benchmarks/train_throughput.py --preset gpt2-124m --seq-len 1024 --batch-size 16 --compile   # one GPU, bf16
    python benchmarks/train_throughput.py --preset gpt2-124m --seq-len 1024 --strategy deepspeed_stage_2 ...

Both sides train the same GPT (same preset, vocabulary, batch, precision, fused AdamW on CUDA, compile or not). The
plain loop feeds random tokens from memory; the framework reads packed windows from shards of the stdlib corpus
(prepared into a temp dir) through the full Lightning stack: datamodule, task, callbacks, logging, checkpointing off.
Timing starts after `--warmup` steps (compile and allocator warm-up excluded) and synchronizes CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from framework.callbacks.throughput import peak_tflops
from framework.models.gpt import GPT, GPTConfig
from framework.objectives.causal_lm import causal_lm_loss


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(config: GPTConfig, batch: int, seq_len: int, steps: int, warmup: int, device: torch.device,
               bf16: bool, compile: bool) -> float:
    """nanoGPT-style loop: tokens/s over `steps` after `warmup`."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda" or None)
    fwd = torch.compile(model) if compile else model
    data = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = causal_lm_loss(fwd(data[:, :-1]), data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return steps * batch * seq_len / (time.perf_counter() - start)


class _Timer(L.Callback):
    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.start, self.end, self.tokens = warmup, device, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.tokens += batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1) * trainer.world_size

    def on_train_end(self, trainer, pl_module):
        sync(self.device)
        self.end = time.perf_counter()


def framework_fit(args: argparse.Namespace, shards: str, vocab: int, device: torch.device, precision: str) -> float:
    from framework.data.datamodule import ShardDataModule
    from framework.distributed import make_strategy
    from framework.tasks.causal_lm import CausalLMTask

    dm = ShardDataModule(path=shards, seq_len=args.seq_len, batch_size=args.batch_size, num_workers=args.workers)
    task = CausalLMTask(preset=args.preset, config={"vocab_size": vocab, "seq_len": args.seq_len}, lr=3e-4,
                        warmup_steps=0, compile=args.compile)
    from framework.callbacks.guard import Guard

    guard = [] if args.no_guard else [Guard()]  # the guards cost one host sync per step
    timer = _Timer(args.warmup, device)
    strategy = make_strategy(args.strategy, precision=precision, accelerator=device.type if device.type == "cpu"
                             else "gpu", micro_batch_size=args.batch_size, gradient_clip_val=1.0)
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, strategy=strategy,
                        precision=precision, max_steps=args.warmup + args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer, *guard])
    trainer.fit(task, datamodule=dm)
    return timer.tokens / (timer.end - timer.start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-small-cpu")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-guard", action="store_true",
                   help="turn the guards off (the non-finite check's and the spike check's per-step host sync)")
    p.add_argument("--workers", type=int, default=2, help="the framework's data workers (the plain loop has none)")
    p.add_argument("--repeats", type=int, default=3,
                   help="alternate plain loop and framework this many times; report each and the medians")
    p.add_argument("--shards", help="a prepared shard dir (default: the stdlib corpus, bytes tokenizer)")
    p.add_argument("--no-overhead", action="store_true",
                   help="skip the overhead measurement: step time of both sides on gpt-tiny (compute ~0)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda"
    precision = "bf16-mixed" if bf16 else "32-true"
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            from framework.data.prepare import prepare

            shards = str(Path(tmp) / "stdlib")
            prepare(None, shards, tokenizer="bytes", progress=False)
        # the preset's vocabulary (unless the shards need more), so both sides do the FLOPs of the real model
        data_vocab = json.loads((Path(shards) / "manifest.json").read_text())["tokenizer"]["vocab_size"]
        preset = GPTConfig.from_preset(args.preset)
        config = GPTConfig.from_preset(args.preset, seq_len=args.seq_len,
                                       vocab_size=max(preset.vocab_size, data_vocab))
        with torch.device("meta"):
            flops_per_token = GPT(config).flops_per_token(args.seq_len)
        pairs = []
        for i in range(max(1, args.repeats)):  # alternating, so a machine's slow phase hits both sides
            base = plain_loop(config, args.batch_size, args.seq_len, args.steps, args.warmup, device, bf16,
                              args.compile)
            ours = framework_fit(args, shards, config.vocab_size, device, precision)
            pairs.append((base, ours))
            print(f"run {i + 1}: plain {base:,.0f} tokens/s, pretrain fit {ours:,.0f} tokens/s, {ours / base:.3f}x",
                  flush=True)
        overhead = None if args.no_overhead else overhead_ms(args, shards, device, bf16, precision)
    peak = peak_tflops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.preset}, batch {args.batch_size} x {args.seq_len}, {precision}, compile={args.compile}, "
          f"strategy={args.strategy}, device {name}, torch {torch.__version__}, guard {'off' if args.no_guard else 'on'}, "
          f"{args.workers} data workers")
    base, ours = statistics.median(b for b, _ in pairs), statistics.median(o for _, o in pairs)
    print(f"median of {len(pairs)} alternating runs:")
    for label, rate in (("plain PyTorch loop", base), (f"pretrain fit ({args.strategy})", ours)):
        mfu = f"   MFU {rate * flops_per_token / (peak * 1e12):6.1%}" if peak else ""
        print(f"{label:<34} {rate:12,.0f} tokens/s   {rate / base:5.3f}x{mfu}")
    print(f"median of the per-run ratios: {statistics.median(o / b for b, o in pairs):.3f}x")
    if overhead is not None:
        step_ms = 1000 * args.batch_size * args.seq_len / base
        print(f"framework overhead: {overhead:.2f} ms per step (median over {max(1, args.repeats)} gpt-tiny pairs), "
              f"{overhead / step_ms:.1%} of this model's {step_ms:.0f} ms plain step")


def overhead_ms(args: argparse.Namespace, shards: str, device: torch.device, bf16: bool, precision: str) -> float:
    """What the framework adds to every step, in ms: step time minus the plain loop's on gpt-tiny (4 x 32 tokens),
    whose compute is so small that the difference is the loop, hooks, logging and guards; data read in-process.
    A difference of step times is steadier than a ratio of two noisy throughputs."""
    tiny = argparse.Namespace(**{**vars(args), "preset": "gpt-tiny", "seq_len": 32, "batch_size": 4, "steps": 300,
                                 "warmup": 20, "workers": 0})
    data_vocab = json.loads((Path(shards) / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    config = GPTConfig.from_preset("gpt-tiny", seq_len=32, vocab_size=max(GPTConfig.from_preset("gpt-tiny").vocab_size,
                                                                          data_vocab))
    tokens = tiny.batch_size * tiny.seq_len
    diffs = []
    for _ in range(max(1, args.repeats)):
        base = plain_loop(config, tiny.batch_size, tiny.seq_len, tiny.steps, tiny.warmup, device, bf16, args.compile)
        ours = framework_fit(tiny, shards, config.vocab_size, device, precision)
        diffs.append(1000 * tokens / ours - 1000 * tokens / base)
        print(f"overhead pair: plain {1000 * tokens / base:.2f} ms/step, pretrain fit {1000 * tokens / ours:.2f} "
              f"ms/step", flush=True)
    return statistics.median(diffs)


if __name__ == "__main__":
    main()
