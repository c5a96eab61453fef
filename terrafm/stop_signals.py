"""The stop signals of `terrafm pretrain`, recorded from the first line of the command on.

Importing torch takes seconds (more on a cold shared file system); a SLURM preemption or a Ctrl-C in that window
killed the process (no checkpoint, no requeue). The command installs `record` before it imports anything heavy;
the trainer's PreemptionFlag replays what arrived (`take`) when it installs its own handlers, so such a run stops
after its first step as any other does.
"""

import os
import signal
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: SIGTERM / SIGUSR1 (preempted), stopped after a checkpoint; requeue and resume
INTERRUPT_EXIT_CODE = 130  # Ctrl-C or a hang-up (a person's stop): stopped after a checkpoint, no requeue
_received: list[int] = []
_original: dict[int, object] = {}
# Signals recorded before `terrafm pretrain --nproc N` became torchrun (exec keeps the environment, not handlers):
# every rank replays them
PENDING_ENV = "TERRAFM_PENDING_STOP"


def _record(signum, frame) -> None:
    _received.append(signum)


def record() -> None:
    """Record the stop signals until the trainer takes them over (SIGHUP left alone under nohup)."""
    for sig in SIGNALS:
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue
        _original[sig] = signal.signal(sig, _record)


def take() -> list[int]:
    """The signals recorded so far, in order (first those handed on by the launcher), forgotten here."""
    handed = [int(s) for s in os.environ.pop(PENDING_ENV, "").split(",") if s.strip().isdigit()]
    got = handed + list(_received)
    _received.clear()
    return got


def hand_on(environ) -> None:
    """Before exec: put the signals recorded so far into `environ` for the processes the exec starts to `take`."""
    pending = take()
    if pending:
        environ[PENDING_ENV] = ",".join(str(s) for s in pending)


def original(sig: int, handler):
    """The handler `sig` had before `record` replaced it with its own, else `handler`."""
    return _original.get(sig, handler) if handler is _record else handler


def when_orphaned(action, poll_s: float, name: str) -> None:
    """Run `action` in a daemon thread once the process that started this one is gone (kill -9, the out-of-memory
    killer: this process is then re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        action()

    threading.Thread(target=watch, daemon=True, name=name).start()


def stop_when_orphaned(poll_s: float = 1.0) -> None:
    """In a rank that torchrun started: SIGTERM this process once torchrun is gone. The ranks then stop at their next
    step with a checkpoint, as on any SIGTERM, where they trained on as orphans to max_steps, holding the run
    folder's lock (and their GPUs); torchrun itself stops them otherwise."""
    when_orphaned(lambda: os.kill(os.getpid(), signal.SIGTERM), poll_s, "terrafm-rank-parent-watch")
