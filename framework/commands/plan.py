"""`pretrain plan`: what fits on your GPUs, and how fast, for every strategy, before you rent them.

    pretrain plan --config configs/gpt/1.5b.yaml --gpus 8 --gpu-memory 80GB --host-memory 512GB [--nodes 2]
    pretrain plan --preset gpt-6.7b --seq-len 2048 --micro-batch 1 --gpus 8 --gpu-memory 80GB --host-memory 1TB

For ddp, fsdp, ZeRO-1/2/3 and the offload variants, each with and without activation checkpointing, it prints the GPU
memory per rank (model states: parameters, gradients, optimizer; activations at the micro-batch and sequence length;
the logits; a fixed allowance for the CUDA context and workspace), the host memory offload needs, and a step time
from the FLOPs at a stated MFU; then it recommends the fastest configuration that fits and its largest micro-batch.
Nothing is allocated: the parameter count comes from the model built on the meta device. Communication is not
modelled (ties go to the strategy that communicates least); "fits" leaves 5% of each memory free.

The memory model (bytes; P parameters, N GPUs, T sequence length, b micro-batch, C width, L layers, V padded vocab):
- model states, bf16 mixed precision with fp32 master weights and AdamW (Rajbhandari et al. 2020, "ZeRO"):
  ddp 16P (fp32 weights, gradients and two moments; Lightning's bf16-mixed keeps fp32 weights) + 4P for DDP's
  gradient buckets when N > 1; fsdp 16P/N + the gathered block being computed and the one prefetched (fp32);
  ZeRO-1 4P + 12P/N; ZeRO-2 2P + 18P/N (DeepSpeed's estimate_zero2_model_states_mem_needs, which counts fp32
  gradient partitions too); ZeRO-3 4*largest_layer + 18P/N; ZeRO-2 offload 2P on the GPU, P*max(4N, 16)*1.5 on the
  host; ZeRO-3 offload 4*largest_layer on the GPU, 18P*1.5 per node on the host (DeepSpeed's
  estimate_zero3_model_states_mem_needs with zero.Init); plus 3 GiB of host memory per rank's process. 32-true: fp32 everywhere (ddp/fsdp 16P; ZeRO's 16-bit copies
  become 32-bit).
- auxiliary frozen models (a task's `aux_models`, e.g. a distillation teacher): weights only, no gradients or
  optimizer states; held in fp32 (4 bytes per parameter), sharded over the N GPUs by fsdp and a full copy on every
  GPU under the other strategies (they are not in DeepSpeed's engine, so ZeRO does not partition them).
- activations per block with SDPA/flash attention (Korthikanti et al. 2022, "Reducing Activation Recomputation", without
  the attention-score term): 34*T*b*C bytes in 16-bit; with activation checkpointing only each block's input
  (2*T*b*C) is kept, plus one block's full set during its recompute; 32-true doubles them.
- logits: b*T*V*(2 + 4) bytes (16-bit logits and their fp32 copy in the loss).
Calibration (one H100 80 GB, 125 GB host, torch 2.11, bf16): a 1.5B GPT (48L/1600, T=1024, micro-batch 16, AdamW, one
GPU, compiled) used 73 GB; ZeRO-3 with CPU offload trained a 3.9B GPT at micro-batch 1, T=1024 in 117 GB of host
RAM; a 6.7B GPT exhausted the host. `tests/test_plan.py` checks these and the tiny presets measured on CPU.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from framework.errors import UserError

GiB = 1 << 30
CONTEXT = 1 * GiB  # CUDA context, cuBLAS/NCCL workspaces, allocator slack: a fixed allowance per GPU
PROCESS = 3 * GiB  # host memory of each rank's process (Python, torch and CUDA libraries, data workers)
# in order of communication per step: communication is not modelled, so a tie in step time goes to the earlier one
STRATEGIES = ("ddp", "deepspeed_stage_1", "deepspeed_stage_2", "fsdp", "deepspeed_stage_3",
              "deepspeed_stage_2_offload", "deepspeed_stage_3_offload")
HEADROOM = 0.95  # a configuration fits when it needs at most this share of the GPU's and the host's memory
OFFLOAD_SLOWDOWN = 2.0  # step time of an offloaded optimizer vs on-GPU, a stated assumption (host Adam + PCIe)


@dataclass(frozen=True)
class Model:
    """What the estimate needs to know about a model."""

    params: int  # parameters, tied ones once
    largest_layer: int  # parameters of the largest module ZeRO-3 gathers at once (a block or the embedding)
    block: int  # parameters of one block
    n_layer: int
    n_embd: int
    vocab: int  # padded vocabulary (the logits' width)
    flops_per_token: int  # training FLOPs (forward + backward) per token at the sequence length
    aux_params: int = 0  # parameters of the task's auxiliary frozen models (a teacher): weights only
    # parameters one token uses (a Mixture-of-Experts model: its top_k experts of num_experts); 0: all of them. Memory
    # counts every parameter; the step time counts the active ones' FLOPs (flops_per_token)
    active_params: int = 0


@dataclass(frozen=True)
class Estimate:
    strategy: str
    checkpointing: bool
    micro_batch: int
    states: float  # bytes per GPU
    activations: float
    logits: float
    host: float  # bytes of host memory per node
    step_seconds: float

    @property
    def gpu(self) -> float:
        return self.states + self.activations + self.logits + CONTEXT


def describe_model(preset: str, family: str = "gpt", seq_len: int | None = None, aux_params: int = 0,
                   **overrides: Any) -> Model:
    """Counts from the model built on the meta device (instant for any size); `aux_params`: the task's auxiliary
    frozen models' parameters (framework.tasks.aux.aux_parameters)."""
    import torch

    from framework.models.registry import family as lookup
    from framework.models.transformer import Block

    config_class = lookup(family).config_class
    config = config_class.from_preset(preset, **overrides)
    if seq_len and seq_len > config.seq_len:  # a longer context than the preset's (learned positions grow)
        config = config_class.from_preset(preset, **{**overrides, "seq_len": seq_len})
    with torch.device("meta"):
        model = lookup(family).model_class(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    block = sum(p.numel() for p in next(m for m in model.modules() if isinstance(m, Block)).parameters())
    embedding = model.transformer.wte.weight.numel()
    T = seq_len or config.seq_len
    fpt = model.flops_per_token(T) if hasattr(model, "flops_per_token") else model.flops(1, T, T) // T
    active = model.num_active_params(non_embedding=False) if getattr(config, "moe", None) is not None else 0
    return Model(params, max(block, embedding), block, config.n_layer, config.n_embd, config.padded_vocab_size, fpt,
                 aux_params, active)


def estimate(model: Model, strategy: str, *, seq_len: int, micro_batch: int, gpus: int, nodes: int = 1,
             checkpointing: bool = False, precision: str = "bf16-mixed", peak_tflops: float = 989.4,
             mfu: float = 0.4) -> Estimate:
    """Memory per GPU and host, and step time, of one configuration (see the module docstring for the model)."""
    P, N, T, b, C = model.params, gpus * nodes, seq_len, micro_batch, model.n_embd
    half = precision != "32-true"
    low = 2 if half else 4  # bytes of the 16-bit (or not) copies ZeRO keeps
    host = 0.0
    if strategy == "ddp":
        states = 16 * P + (4 * P if N > 1 else 0)
    elif strategy == "fsdp":
        states = 16 * P / N + 2 * 4 * model.largest_layer
    elif strategy == "deepspeed_stage_1":
        states = 2 * low * P + 12 * P / N
    elif strategy == "deepspeed_stage_2":
        states = low * P + 18 * P / N
    elif strategy == "deepspeed_stage_3":
        states = 4 * model.largest_layer + 18 * P / N
    elif strategy == "deepspeed_stage_2_offload":
        states, host = low * P, P * max(4 * N, 16) * 1.5
    elif strategy == "deepspeed_stage_3_offload":
        states, host = 4 * model.largest_layer, P * 18 * 1.5 / nodes
    else:
        raise UserError(f"unknown strategy '{strategy}'; choose from {', '.join(STRATEGIES)}")
    act_bytes = 1 if half else 2  # the 34*T*b*C count is for 16-bit activations
    per_block = 34 * T * b * C * act_bytes
    if checkpointing:
        activations = model.n_layer * 2 * T * b * C * act_bytes + per_block
    else:
        activations = model.n_layer * per_block
    logits = b * T * model.vocab * ((2 if half else 4) + 4)
    flops = model.flops_per_token * T * b * (4 / 3 if checkpointing else 1)  # a recompute adds one forward
    seconds = flops / (peak_tflops * 1e12 * mfu)
    if strategy.endswith("offload"):
        seconds *= OFFLOAD_SLOWDOWN
    host += PROCESS * gpus
    if model.aux_params:  # frozen weights only, fp32 as loaded; FSDP2 shards them like the trained model
        states += 4 * model.aux_params / (N if strategy == "fsdp" else 1)
    return Estimate(strategy, checkpointing, b, states, activations, logits, host, seconds)


def plan(model: Model, *, seq_len: int, micro_batch: int, gpus: int, nodes: int, gpu_memory: float,
         host_memory: float, precision: str, peak_tflops: float, mfu: float
         ) -> tuple[list[Estimate], Estimate | None]:
    """Every strategy with and without checkpointing at `micro_batch`, and the fastest one that fits (at its largest
    fitting micro-batch, up to 8x the configured one)."""
    rows = [estimate(model, s, seq_len=seq_len, micro_batch=micro_batch, gpus=gpus, nodes=nodes, checkpointing=ac,
                     precision=precision, peak_tflops=peak_tflops, mfu=mfu)
            for s in STRATEGIES for ac in (False, True)]
    best: Estimate | None = None
    for row in rows:
        b = 1
        fitting = None
        while b <= 8 * micro_batch:
            e = estimate(model, row.strategy, seq_len=seq_len, micro_batch=b, gpus=gpus, nodes=nodes,
                         checkpointing=row.checkpointing, precision=precision, peak_tflops=peak_tflops, mfu=mfu)
            if not fits(e, gpu_memory, host_memory):
                break
            fitting, b = e, b * 2
        if fitting is not None:
            per_token = fitting.step_seconds / fitting.micro_batch
            if best is None or per_token < best.step_seconds / best.micro_batch:
                best = fitting
    return rows, best


def fits(e: Estimate, gpu_memory: float, host_memory: float) -> bool:
    return e.gpu <= HEADROOM * gpu_memory and e.host <= HEADROOM * host_memory


def parse_bytes(text: str) -> float:
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"bad memory size '{text}'; use e.g. 80GB, 512GB, 1TB")
    return float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]


def _from_config(path: str) -> dict[str, Any]:
    """preset, family, model overrides, seq_len, micro-batch, precision from a `pretrain fit` YAML."""
    import yaml

    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"cannot read config '{path}' ({e.strerror or e})") from None
    model = cfg.get("model", {}) or {}
    args = model.get("init_args", model) or {}
    task = model.get("class_path", "framework.tasks.causal_lm.CausalLMTask")
    data = cfg.get("data", {}) or {}
    data = data.get("init_args", data) or {}
    trainer = cfg.get("trainer", {}) or {}
    return {"preset": args.get("preset", "gpt-small-cpu"), "family": "bert" if "masked_lm" in task else "gpt",
            "overrides": args.get("config") or {}, "seq_len": data.get("seq_len", 256),
            "micro_batch": data.get("batch_size", 8), "precision": str(trainer.get("precision", "bf16-mixed")),
            "checkpointing": bool(args.get("activation_checkpointing", False)), "aux": _aux_parameters(task, args)}


def _aux_parameters(task: str, init_args: dict[str, Any]) -> int:
    """The parameters of the auxiliary frozen models the task declares (its `aux_models`), read from their sources'
    configs. The task class is imported only when some init arg names an existing path besides init_from (its
    import costs seconds; an auxiliary model's source is such a path)."""
    import importlib
    import os

    if not any(isinstance(v, str) and k != "init_from" and os.path.exists(v.removeprefix("hf:"))  # hf:DIR too
               for k, v in init_args.items()):
        return 0
    from framework.tasks.aux import aux_parameters

    module, _, name = task.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"cannot import the config's model.class_path '{task}'") from None
    return sum(aux_parameters(cls, init_args).values())


def _gb(x: float) -> str:
    return f"{x / GiB:7.1f}"


def main(argv: list[str]) -> None:
    from framework.commands.common import ArgParser as _Parser
    from framework.models.registry import text_backbones

    p = _Parser(prog="pretrain plan", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a `pretrain fit` YAML (model preset and config, seq_len, batch_size, precision)")
    p.add_argument("--preset", help="a model preset instead of (or over) the config's")
    p.add_argument("--family", choices=text_backbones(), help="the preset's family (default gpt)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, help="sequences per GPU per step")
    p.add_argument("--precision", help="bf16-mixed (default) or 32-true")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-memory", default="80GB", help="memory per GPU (default 80GB)")
    p.add_argument("--host-memory", default="512GB", help="host memory per node (default 512GB)")
    p.add_argument("--gpu", default="H100", help="GPU model for the peak FLOP/s (default H100)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    args = p.parse_args(argv)
    base = _from_config(args.config) if args.config else {"preset": "gpt-small-cpu", "family": "gpt", "overrides": {},
                                                           "seq_len": 1024, "micro_batch": 8,
                                                           "precision": "bf16-mixed", "checkpointing": False}
    preset, family = args.preset or base["preset"], args.family or base["family"]
    seq_len, micro_batch = args.seq_len or base["seq_len"], args.micro_batch or base["micro_batch"]
    precision = args.precision or base["precision"]
    if min(seq_len, micro_batch, args.gpus, args.nodes) < 1 or not 0 < args.mfu <= 1:
        raise UserError("--seq-len, --micro-batch, --gpus and --nodes must be >= 1 and --mfu in (0, 1]")
    from framework.callbacks.throughput import peak_flops

    peak = peak_flops(args.gpu, precision)
    if peak is None:
        raise UserError(f"no peak FLOP/s known for GPU '{args.gpu}' at {precision}; use e.g. --gpu H100 or A100")
    model = describe_model(preset, family, seq_len, base.get("aux", 0), **base["overrides"])
    gpu_mem, host_mem = parse_bytes(args.gpu_memory), parse_bytes(args.host_memory)
    rows, best = plan(model, seq_len=seq_len, micro_batch=micro_batch, gpus=args.gpus, nodes=args.nodes,
                      gpu_memory=gpu_mem, host_memory=host_mem, precision=precision, peak_tflops=peak / 1e12,
                      mfu=args.mfu)
    n = args.gpus * args.nodes
    aux = f" (+ {model.aux_params / 1e9:.2f}B frozen auxiliary)" if model.aux_params else ""
    if model.active_params:
        aux = f" ({model.active_params / 1e9:.2f}B active per token){aux}"
    print(f"{preset}: {model.params / 1e9:.2f}B parameters{aux}, seq {seq_len}, micro-batch {micro_batch}, "
          f"{precision}, "
          f"{args.nodes} node(s) x {args.gpus} {args.gpu} ({args.gpu_memory}, host {args.host_memory}), MFU "
          f"{args.mfu:.0%}")
    print(f"{'strategy':<27} {'ckpt':>4} {'states':>7} {'activ.':>7} {'logits':>7} {'GPU GiB':>8} {'host GiB':>8} "
          f"{'step s':>7} {'tok/s':>10}  fits")
    for e in rows:
        ok = "yes" if fits(e, gpu_mem, host_mem) else "no"
        tokens = seq_len * e.micro_batch * n / e.step_seconds
        print(f"{e.strategy:<27} {'yes' if e.checkpointing else 'no':>4} {_gb(e.states)} {_gb(e.activations)} "
              f"{_gb(e.logits)} {_gb(e.gpu):>8} {_gb(e.host):>8} {e.step_seconds:7.2f} {tokens:10,.0f}  {ok}")
    if best is None:
        print("nothing fits: add GPUs or nodes, host memory for offload, or lower --seq-len / --micro-batch")
        return
    print(f"recommended: --trainer.strategy {best.strategy}"
          f"{' --model.init_args.activation_checkpointing true' if best.checkpointing else ''} "
          f"--data.batch_size {best.micro_batch}   ({_gb(best.gpu).strip()} GiB per GPU, "
          f"~{seq_len * best.micro_batch * n / best.step_seconds:,.0f} tokens/s at {args.mfu:.0%} MFU)")
    if best.micro_batch != micro_batch:
        print(f"  (the largest micro-batch that fits, up to 8x the configured {micro_batch}; keep the global batch "
              "with --trainer.accumulate_grad_batches)")
