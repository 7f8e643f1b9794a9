"""Checkpoints beyond Lightning's defaults: what a checkpoint path holds (formats), resuming a sharded checkpoint
on another world size (reshard), full weights from any checkpoint without a process group (consolidate), and
`pretrain export` (export).

Import the submodules directly (`from framework.checkpoint.export import export`): this package imports nothing
heavy on its own, so `pretrain --help` and the CLI's other commands stay fast.
"""
