"""`pretrain distill-cache`: run a teacher once over the train windows and store its top-k next-token log-probabilities
(framework.data.teacher_cache), so that distillation can train without the teacher in memory:

    pretrain distill-cache --teacher runs/gpt-smoke/checkpoints/last.ckpt --data data/stdlib --seq-len 256 \\
        --top-k 16 --temperature 1.0 --output data/stdlib-teacher
    pretrain fit --config configs/distill/smoke.yaml --data.teacher_cache data/stdlib-teacher

--data, --seq-len, --seed and --no-shuffle must be the fit's data settings (they fix which tokens each window
holds); the fit checks them against the cache and refuses another in one line.
"""

from __future__ import annotations

import argparse

import torch

from framework.checkpoint.formats import trust_checkpoint
from framework.errors import UserError


def main(argv: list[str]) -> None:
    from framework.checkpoint.extras import aux_record
    from framework.checkpoint.hf import HF_PREFIX
    from framework.checkpoint.load import hf_model, load_checkpoint_model
    from framework.checkpoint.reader import Checkpoint, is_export
    from framework.data.datamodule import ShardDataModule
    from framework.data.teacher_cache import write_cache
    from framework.models.registry import from_pretrained

    p = argparse.ArgumentParser(prog="pretrain distill-cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True,
                   help="a GPT checkpoint of `pretrain fit`, a `pretrain export` dir or hf:DIR (GPT-2, Llama)")
    p.add_argument("--data", required=True, help="the prepared shards the student trains on (data.path)")
    p.add_argument("--output", required=True, help="a new directory for the cache")
    p.add_argument("--seq-len", type=int, default=256, help="data.seq_len of the fit")
    p.add_argument("--seed", type=int, default=1234, help="data.seed of the fit")
    p.add_argument("--no-shuffle", action="store_true", help="the fit has data.shuffle=false")
    p.add_argument("--epochs", type=int, default=1, help="epochs to cache (each has its own window order)")
    p.add_argument("--top-k", type=int, default=16, help="teacher outputs kept per position")
    p.add_argument("--temperature", type=float, default=1.0, help="model.temperature of the fit")
    p.add_argument("--batch-size", type=int, default=16, help="windows per teacher forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickled objects in a checkpoint file")
    args = p.parse_args(argv)
    trust_checkpoint(args.trust_checkpoint)
    if args.seq_len < 1 or args.batch_size < 1:
        raise UserError("--seq-len and --batch-size must be >= 1")
    if is_export(args.teacher) or args.teacher.startswith(HF_PREFIX):  # ours, or a Hugging Face directory
        source = Checkpoint(args.teacher)
        teacher = hf_model(source) if source.kind == "hf" else from_pretrained(args.teacher)
        family = source.model_config.get("model_type")
    else:
        teacher, _ = load_checkpoint_model(args.teacher, "gpt")
        family = "gpt"
    if family != "gpt":
        raise UserError(f"'{args.teacher}' holds a {family!r} model; the cache holds next-token outputs of a GPT")
    teacher.to(args.device).eval()
    dm = ShardDataModule(path=args.data, seq_len=args.seq_len, seed=args.seed, shuffle=not args.no_shuffle)
    dm.setup("fit")
    if teacher.config.vocab_size != dm.vocab_size:
        raise UserError(f"the teacher's vocabulary has {teacher.config.vocab_size} tokens but the data's "
                        f"{dm.vocab_size}; distil on data tokenized like the teacher")
    if args.seq_len > teacher.config.seq_len:
        raise UserError(f"--seq-len {args.seq_len} is longer than the teacher's context ({teacher.config.seq_len})")
    out = write_cache(args.output, lambda tokens: teacher(tokens.to(args.device)), dm._train, seed=args.seed,
                      shuffle=not args.no_shuffle, seq_len=args.seq_len, eod=dm.special_ids["eod"],
                      vocab_size=dm.vocab_size, epochs=args.epochs, top_k=args.top_k, temperature=args.temperature,
                      teacher=aux_record(args.teacher), batch_size=args.batch_size,
                      progress=lambda line: print(line, flush=True))
    print(f"wrote {out}")
