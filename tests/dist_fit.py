"""Helpers for tests that run `pretrain fit` on several ranks in a subprocess: a corpus, a config, test callbacks.

The callbacks are named by class path in the fit config (`dist_fit.RankRecorder`, ...), so each rank, which Lightning
starts by re-running the command line, loads them too. Every rank writes its own file.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent

# Variables that would make Lightning think it runs under torchrun/SLURM (and not launch the ranks itself).
_LAUNCHER_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
                  "MASTER_PORT")


# ---------------------------------------------------------------- fixtures built by the tests
def make_corpus(src: Path, docs: int = 12, words: int = 60, seed: int = 0) -> None:
    """Text with (practically) unique 33-byte windows: random words, so a repeated window means a repeated sample."""
    rng = random.Random(seed)
    vocab = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
             "upsilon phi chi psi omega").split()
    src.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        text = " ".join(rng.choice(vocab) + str(rng.randrange(100)) for _ in range(words))
        (src / f"doc{i:03d}.txt").write_text(f"# {i}\n{text}\n")


FAMILY_TASKS = {  # family -> (task, tiny preset, datamodule)
    "gpt": ("framework.tasks.causal_lm.CausalLMTask", "gpt-tiny", "framework.data.datamodule.ShardDataModule"),
    "bert": ("framework.tasks.masked_lm.MaskedLMTask", "bert-test", "framework.data.datamodule.MaskedLMDataModule"),
    # fine-tuning: the backbone comes from --model.init_args.init_from (no preset)
    "classify": ("framework.tasks.classification.ClassificationTask", None,
                 "framework.data.documents.ClassificationDataModule"),
}


def write_config(tmp: Path, shards: Path, *, strategy: str, devices: int, max_steps: int, stop_at: int | None = None,
                 every_n_steps: int = 100, callbacks: list[dict] | None = None, label: int = 0, family: str = "gpt",
                 **trainer: Any) -> Path:
    """A tiny GPT (family="gpt"), masked-LM encoder (family="bert") or classifier (family="classify", shards from
    `prepare --label-field`, backbone from init_from) fit (fp32, no dropout, 1 data worker) with a
    RankRecorder writing `tmp/steps.rank{R}.jsonl`; `label` tells this fit's records from those of earlier fits in
    the same directory."""
    recorder = {"class_path": "dist_fit.RankRecorder",
                "init_args": {"path": str(tmp / "steps"), "stop_at": stop_at, "label": label}}
    config = {
        "seed_everything": 7,
        "model": {"class_path": FAMILY_TASKS[family][0],
                  "init_args": {"lr": 3e-3, "warmup_steps": 2,
                                **({"preset": FAMILY_TASKS[family][1]} if FAMILY_TASKS[family][1] else {})}},
        "data": {"class_path": FAMILY_TASKS[family][2],
                 "init_args": {"path": str(shards), "seq_len": 32, "batch_size": 4, "num_workers": 1,
                               "shuffle_block": 16}},
        "trainer": {"default_root_dir": str(tmp / "run"), "accelerator": "cpu", "devices": devices,
                    "strategy": strategy, "max_steps": max_steps, "max_epochs": 1, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                    "callbacks": [recorder, *(callbacks or [])], **trainer},
        "checkpoint": {"every_n_steps": every_n_steps, "keep": 2},
        "summary": {"sample_tokens": 0, "baseline": False},
        "wandb": {"mode": "offline"},
    }
    path = tmp / "config.json"
    path.write_text(json.dumps(config))
    return path


def cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m framework ARGS` in a clean environment (Lightning launches the other ranks itself)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and k != "WANDB_SERVICE"
           and not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))}
    env.update(WANDB_MODE="offline", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    return subprocess.run([sys.executable, "-m", "framework", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def fit(config: Path, *args: str) -> float:
    """Run `pretrain fit --config CONFIG ARGS`; assert it succeeded; return its wall time."""
    t0 = time.perf_counter()
    r = cli("fit", "--config", str(config), *args, cwd=config.parent)
    assert r.returncode == 0, f"fit {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-8000:]}"
    return time.perf_counter() - t0


def spawn_ranks(target: Any, out: Path, world: int = 2, timeout: float = 120) -> None:
    """Run `target(rank, world, port, str(out))` in `world` spawned processes (a fresh interpreter each, as torchrun's
    ranks), which meet over gloo on a free local port; fails unless every one exits 0."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, world, port, str(out))) for rank in range(world)]
    for p in procs:
        p.start()
    for rank, p in enumerate(procs):
        p.join(timeout=timeout)
        assert p.exitcode == 0, f"rank {rank} exited with {p.exitcode}"


def records(tmp: Path) -> list[dict]:
    """Every rank's step records, in (run, step, rank) order."""
    out = []
    for f in sorted(tmp.glob("steps.rank*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines()]
    return sorted(out, key=lambda r: (r["run"], r["step"], r["rank"]))


# ---------------------------------------------------------------- callbacks (run inside the fit processes)
class RankRecorder(L.Callback):
    """Appends, per trained batch, the step, this rank's world and the token windows it trained on to
    `{path}.rank{R}.jsonl`. stop_at: end the fit after that many steps, as a preempted job would."""

    def __init__(self, path: str, stop_at: int | None = None, label: int = 0):
        self.path, self.stop_at, self.label = path, stop_at, label

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        record = {"run": self.label, "step": trainer.global_step - 1, "rank": trainer.global_rank,
                  "world": trainer.world_size, "loss": float(outputs["loss"]),
                  "windows": (batch["tokens"] if "tokens" in batch else batch["input_ids"]).tolist(), **self.extra()}
        with open(f"{self.path}.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True

    def extra(self) -> dict:
        return {}


class StartRecorder(RankRecorder):
    """RankRecorder whose records also name the start of the processes that wrote them ("start": rank 0's process
    id and clock when the fit started, the same on every rank) and the Trainer's num_nodes: an elastic job's restarts
    retrain the steps after the checkpoint they resume, and only the last start's records of a step count."""

    def on_train_start(self, trainer, pl_module):
        self.start = trainer.strategy.broadcast(f"{os.getpid()}-{time.time():.6f}")
        self.nodes = trainer.num_nodes

    def extra(self) -> dict:
        return {"start": self.start, "nodes": self.nodes}


class Gate(L.Callback):
    """Holds every rank after step `at` (a global step count) until the file `{path}.{at}.open` exists, having
    written `{path}.{at}.rank{R}` to say it is there; a rank also goes on when it was told to stop (the Preemption
    flag, as when torchrun restarts the processes) or after `wait` seconds. Lets a test act while training is
    mid-run at a known step, whatever the speed of the machine."""

    def __init__(self, path: str, at: list[int], wait: float = 180):
        self.path, self.at, self.wait = path, at, wait

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step not in self.at:
            return
        from framework.callbacks.preemption import Preemption

        step = trainer.global_step
        Path(f"{self.path}.{step}.rank{trainer.global_rank}").write_text(str(os.getpid()))
        told = [c for c in trainer.callbacks if isinstance(c, Preemption)]
        deadline = time.monotonic() + self.wait
        while not os.path.exists(f"{self.path}.{step}.open") and time.monotonic() < deadline:
            if any(c.received is not None for c in told):
                return
            time.sleep(0.05)


class PlaceRecorder(L.Callback):
    """Where this rank runs, as the training sees it, written as training starts to `{path}.rank{R}.json`: its global,
    local and node rank, the world and node count, the host name and the launcher's variables."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        import socket

        record = {"global_rank": trainer.global_rank, "local_rank": trainer.local_rank, "node_rank": trainer.node_rank,
                  "world": trainer.world_size, "num_nodes": trainer.num_nodes, "hostname": socket.gethostname(),
                  "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE",
                                                         "LOCAL_WORLD_SIZE", "MASTER_ADDR", "GLOO_SOCKET_IFNAME")}}
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(record))


class RngProbe(L.Callback):
    """Gives each rank its own random stream on a fresh start (ranks' streams differ, as they do once anything
    rank-dependent draws from them), draws from it every step, and appends a digest of each rank's CPU RNG state after
    every step to `{path}.rank{R}.jsonl`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        if not trainer.ckpt_path:  # a resumed run must get its streams back from the checkpoint
            torch.rand(1 + trainer.global_rank)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.rand(3)
        import hashlib

        digest = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        with open(f"{self.path}.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step - 1, "rank": trainer.global_rank, "rng": digest}) + "\n")


class OptimizerProbe(L.Callback):
    """Digest of the full (unsharded) training state: per parameter checksums of its fp32 value, Adam moments and
    the value the forward uses, the Adam step counts, and each param group's hyperparameters. Written by rank 0
    (every rank takes part in the gathers) to `{path}.start.json` once a resumed checkpoint is restored and
    `{path}.end.json` after the last step."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        if trainer.ckpt_path:  # a fresh run has no optimizer state yet
            self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module):
        self._dump(trainer, pl_module, "end")

    def _dump(self, trainer, pl_module, when: str) -> None:
        digest = {"global_step": trainer.global_step, "world": trainer.world_size, "params": {}, "groups": []}
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is not None:
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            optimizer = engine.optimizer.optimizer  # the wrapped torch AdamW: its groups hold the hyperparameters
            if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
                # ZeRO-1/2 link each parameter to its Adam moments after the first step of param group 0, before
                # group 1 has any (deepspeed/runtime/zero/stage_1_and_2.py `_optimizer_step`): link them again
                engine.optimizer._hp_optimizer_states_linked = False
                engine.optimizer._lazy_init_hp_params_optimizer_state()
            import deepspeed

            for name, p in pl_module.named_parameters():
                value = safe_get_full_fp32_param(p)
                m, v = safe_get_full_optimizer_state(p, "exp_avg"), safe_get_full_optimizer_state(p, "exp_avg_sq")
                with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                    used = p.detach().clone()  # what the forward computes with (under ZeRO-3: gathered)
                digest["params"][name] = _sums(value, m, v, used)
            states = list(optimizer.state.values())
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optimizer = trainer.optimizers[0]
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            osd = get_optimizer_state_dict(pl_module, optimizer, options=full)
            values = {}
            for name, p in pl_module.named_parameters():
                values[name] = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            for name, value in values.items():
                state = osd.get("state", {}).get(name, {})  # the full state is on rank 0 only
                digest["params"][name] = _sums(value, state.get("exp_avg"), state.get("exp_avg_sq"), value)
            states = list(osd.get("state", {}).values())
        digest["adam_steps"] = sorted({float(st["step"]) for st in states if "step" in st})  # one per optimizer step
        digest["groups"] = [{k: v for k, v in g.items() if k != "params" and isinstance(v, (bool, int, float, tuple))}
                            for g in optimizer.param_groups]
        if trainer.is_global_zero:
            Path(f"{self.path}.{when}.json").write_text(json.dumps(digest))


def _sums(*tensors: torch.Tensor | None) -> list[float | None]:
    """An order-sensitive checksum per tensor: elements moved within a tensor change it, unlike a plain sum."""
    return [None if t is None else _checksum(t) for t in tensors]


def _checksum(t: torch.Tensor) -> float:
    x = t.detach().double().reshape(-1)
    return float((x * (1 + torch.arange(x.numel(), dtype=torch.float64).sin())).sum())


class LogitsProbe(L.Callback):
    """At the end of the fit (or of `pretrain validate`), the logits of a fixed input on the live (possibly sharded)
    model, saved by rank 0 to `path`. Every rank runs the forward: under ZeRO-3 and FSDP2 it gathers the shards."""

    def __init__(self, path: str, seq_len: int = 16):
        self.path, self.seq_len = path, seq_len

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.training and trainer.state.fn == "validate":
            self._save(trainer, pl_module)

    def _save(self, trainer, pl_module):
        idx = torch.arange(2 * self.seq_len).reshape(2, self.seq_len) % 200  # (2, T) token ids
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            logits = pl_module(idx.to(pl_module.device)).float().cpu()  # (2, T, V)
        pl_module.train(was_training)
        if trainer.is_global_zero:
            torch.save({"input": idx, "logits": logits}, self.path)


class WeightsProbe(L.Callback):
    """The full (unsharded) weights of the model as training starts, saved by rank 0 to `path` as {name: tensor}.
    Every rank takes part in the gathers (FSDP2 DTensors, ZeRO-3 partitions)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        out = {}
        for name, p in pl_module.model.named_parameters():
            if hasattr(p, "full_tensor"):
                value = p.full_tensor()
            elif hasattr(p, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    value = p.detach().clone()
            else:
                value = p.detach()
            out[name] = value.float().cpu().clone()
        if trainer.is_global_zero:
            torch.save({"weights": out, "global_step": trainer.global_step}, self.path)


class StepWeights(L.Callback):
    """After every step, each rank appends the step and an order-sensitive checksum of its full weights (FSDP2 shards
    gathered) to `{path}.rank{R}.jsonl`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        values = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in pl_module.parameters()]
        record = {"step": trainer.global_step, "rank": trainer.global_rank,
                  "weights": sum(_checksum(v) for v in values), "finite": all(bool(v.isfinite().all()) for v in values)}
        with open(f"{self.path}.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
