"""Checkpoints beyond Lightning's defaults: what a checkpoint path holds (formats), full tensors from any layout
without a process group (consolidate), one reader that opens any checkpoint or export once and hands out its metadata
and tensors (reader), resuming a sharded checkpoint on another world size (reshard), `--model.init_from` (init_from)
and `pretrain export` (export).

Import the submodules directly (`from framework.checkpoint.export import export`): this package imports nothing
heavy on its own, so `pretrain --help` and the CLI's other commands stay fast.
"""
