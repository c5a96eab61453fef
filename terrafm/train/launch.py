"""The launcher `terrafm pretrain --nproc N` becomes: torchrun (torch.distributed.run) in this process, ending the way
the ranks end, in their exit code, instead of torchrun's traceback and exit 1.

torchrun raises SignalException when a stop signal reaches it (after it has forwarded the signal to the ranks and
waited for their checkpoint) and ChildFailedError when a rank exits non-zero. Run as a program (torchrun's own
`main`), both printed a traceback and exited 1: a Ctrl-C whose ranks had checkpointed and exited 130 ended in
`SignalException: Process N got signal: 2`, and a preempted run in the exit code of a crash.

    python -m terrafm.train.launch TORCHRUN_ARGS...
"""

import signal
import sys

from terrafm.stop_signals import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE

# What the ranks exit with for each stop signal (terrafm.train.cli): Ctrl-C and a hang-up stop with a checkpoint
# and 130; SIGTERM and SLURM's SIGUSR1 checkpoint for a requeue, 75.
STOP_EXIT_CODES = {signal.SIGINT: INTERRUPT_EXIT_CODE, signal.SIGHUP: INTERRUPT_EXIT_CODE,
                   signal.SIGTERM: REQUEUE_EXIT_CODE, signal.SIGUSR1: REQUEUE_EXIT_CODE}


def exit_code_of_signal(signum: int) -> int:
    """The launcher's exit code after torchrun stopped on signal `signum`: the ranks' code for it (STOP_EXIT_CODES),
    else the shell's 128 + signum."""
    return STOP_EXIT_CODES.get(signum, 128 + int(signum))


def exit_code_of_ranks(exitcode: int) -> int:
    """The launcher's exit code for the first rank that failed: its own code, or 128 + N for a rank killed by
    signal N (torchrun reports -N)."""
    return exitcode if exitcode > 0 else 128 - exitcode if exitcode < 0 else 1


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except SignalException as err:  # the ranks got the signal and have said what they did (above)
        return exit_code_of_signal(err.sigval)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = exit_code_of_ranks(failure.exitcode)
        if failure.exitcode < 0:  # a rank that printed nothing: killed (the out-of-memory killer, kill -9)
            print(f"terrafm pretrain: rank {rank} was killed by signal {-failure.exitcode}; the run stopped",
                  file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
