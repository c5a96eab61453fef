"""Test harness: run the trainer on the synthetic loader in its own process (plain or under torchrun).

    python tests/train/run_pretrain.py OUT_DIR [--resume | --resume-from CHECKPOINT] [--batch B]
                                       [--kill-at-batch N] [--hang-in-save N] [--inf-grad-steps S,...]
                                       [--collapse-on-rank R] [--corrupt-batch R:N] [overrides ...]
--kill-at-batch N: SIGKILL this process when the loader is asked for its N-th batch (1-based).
--hang-in-save N: on the N-th checkpoint save, let DCP finish writing, touch OUT_DIR/hanging, then
sleep: the test SIGKILLs it while the checkpoint is still a `.tmp` folder.
--inf-grad-steps S,...: at these 0-based optimiser steps one parameter's gradient is filled with inf
(the loss stays finite).
--collapse-on-rank R: the collapse monitors of rank R alone read as collapsed (the ranks disagree).
--corrupt-batch R:N: rank R's loader meets a corrupt chunk (ChecksumError) when asked for its N-th batch (1-based).
Errors exit as `terrafm pretrain` does (the same `train_exit_code`): 2 for a SetupError or ConfigError, 1 for
other TrainingErrors.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import TINY_OVERRIDES, SyntheticLoader  # noqa: E402

from terrafm.config import load_config  # noqa: E402
from terrafm.data.shards import ChecksumError  # noqa: E402
from terrafm.train import checkpoint, trainer  # noqa: E402
from terrafm.train.cli import end_of_rank, train_exit_code  # noqa: E402


class FaultAtBatch(SyntheticLoader):
    """Calls `fault` when the loader is asked for its `at`-th batch (1-based)."""

    def __init__(self, at: int, fault, **kwargs):
        super().__init__(**kwargs)
        self.at, self.fault, self.served = at, fault, 0

    def __iter__(self):
        for batch in super().__iter__():
            self.served += 1
            if self.served == self.at:
                self.fault()
            yield batch


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def corrupt_chunk() -> None:
    raise ChecksumError(f"part-00004.bin: record 130 s1 band 0: crc32 0x1 != stored 0x2 (rank {os.environ['RANK']})")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--resume-from", default=None, help="a checkpoint folder (of another run)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--kill-at-batch", type=int, default=0)
    parser.add_argument("--hang-in-save", type=int, default=0)
    parser.add_argument("--inf-grad-steps", default="")
    parser.add_argument("--collapse-on-rank", type=int, default=-1)
    parser.add_argument("--corrupt-batch", default="-1:0")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cfg = load_config(None, TINY_OVERRIDES + [f"train.out_dir={args.out}", "train.run_name=run",
                                              f"data.batch_size={args.batch}"] + args.overrides)
    kwargs = dict(batch_size=args.batch, rank=rank, world_size=world, seed=cfg.train.seed)
    loader = FaultAtBatch(args.kill_at_batch, kill, **kwargs) if args.kill_at_batch else SyntheticLoader(**kwargs)
    corrupt_rank, corrupt_at = (int(v) for v in args.corrupt_batch.split(":"))
    if corrupt_rank == rank:
        loader = FaultAtBatch(corrupt_at, corrupt_chunk, **kwargs)
    if args.hang_in_save:
        original, calls = checkpoint.dcp.save, []

        def hanging_save(*a, **k):
            result = original(*a, **k)
            calls.append(1)
            if len(calls) == args.hang_in_save:
                Path(args.out, "hanging").touch()
                time.sleep(600)
            return result

        checkpoint.dcp.save = hanging_save
    if args.inf_grad_steps:
        inf_steps, original_clip, calls = {int(v) for v in args.inf_grad_steps.split(",")}, trainer.clip_gradients, []

        def clip_with_inf(params, max_norm, per_parameter):
            if len(calls) in inf_steps:
                next(p for p in params if p.grad is not None).grad.fill_(float("inf"))
            calls.append(1)
            return original_clip(params, max_norm, per_parameter)

        trainer.clip_gradients = clip_with_inf
    if args.collapse_on_rank == rank:
        trainer.collapse_state = lambda *a, **k: f"collapse: rank {rank}'s monitors (test)"
    return train_exit_code(cfg, args.resume_from or args.resume, loader)


if __name__ == "__main__":  # a process of its own, so it ends as the `terrafm pretrain` process does
    sys.exit(end_of_rank(main(), program=True))
