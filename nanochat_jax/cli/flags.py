"""Flags that several commands take."""

from __future__ import annotations


def add_checkpoint_flags(parser, required: bool = True) -> None:
    """`--checkpoint` and `--step`, taken by every command that reads a trained run."""
    parser.add_argument("--checkpoint", required=required, help="the run's workdir")
    parser.add_argument("--step", type=int, default=None, help="default: the latest")


def add_batches_flag(parser) -> None:
    """`--batches`: how many validation batches bits/byte is measured on."""
    parser.add_argument("--batches", type=int, default=None,
                        help="validation batches (default: the run's training.eval_batches)")
