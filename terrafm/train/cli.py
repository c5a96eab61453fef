"""`terrafm pretrain`: train from a preset or YAML file plus dotted overrides.

    terrafm pretrain                                   # tiny_cpu on the bundled sample tiles (CPU, ~2-3 min)
    terrafm pretrain --config vitb_h100 train.max_steps=20 optim.lr=1e-4
    terrafm pretrain --nproc 2 --config tiny_cpu       # relaunches itself under torchrun on this node
    terrafm pretrain --config vitb_h100 --out /scratch/runs/vitb --resume   # SLURM requeue

Exit codes: 0 done; 1 training diverged (NaN/Inf loss, too many non-finite gradient norms in a row, collapse
under train.stop_on_collapse);
2 fix the setup and rerun (configuration, output folder, data, checkpoint, full disk, out of memory: the
message says what); 75 (EX_TEMPFAIL) stopped by SIGTERM/SIGUSR1 after writing a checkpoint: requeue and pass --resume;
130 stopped by Ctrl-C or a hang-up (SIGHUP) after a checkpoint at the step's end (a second Ctrl-C stops at once).
"""

import argparse
import logging
import os
import sys
from pathlib import Path

from terrafm import stop_signals
from terrafm.config import DEFAULT_PRESET, ConfigError, load_config, parse_override, presets
from terrafm.fileio import out_of_memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. train.max_steps=20 optim.lr=1e-4")
    parser.add_argument("--config", default=DEFAULT_PRESET,
                        help=f"preset ({', '.join(presets())}) or a .yaml/.yml file (default: {DEFAULT_PRESET})")
    parser.add_argument("--out", metavar="DIR",
                        help="the run folder (default: train.out_dir/train.run_name, e.g. runs/tiny_cpu)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run's latest checkpoint if it has one (SLURM requeue: always pass it)")
    parser.add_argument("--resume-from", metavar="CKPT",
                        help="start from this checkpoint (a step_N folder, checkpoints/ folder or run folder); with "
                             "--resume, only while the run has no checkpoint of its own (a requeued job continues)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes on this node (default: 1); > 1 relaunches under torchrun --standalone")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


# Seconds torchrun waits for the ranks' stop checkpoint after forwarding a signal, before SIGKILL: its default of 30
# killed a ViT-L stop step and save inside a job's --signal=USR1@120 window (the SLURM scripts' SHUTDOWN_TIMEOUT).
SHUTDOWN_TIMEOUT_S = 110


def _torchrun_command(args: argparse.Namespace) -> list[str]:
    # SIGUSR1 is not in torchrun's default --signals-to-handle: without it torchrun dies of the signal
    # and the ranks never see it (no stop checkpoint)
    # terrafm.train.launch is torchrun, ending in the ranks' exit code instead of torchrun's traceback and exit 1
    cmd = [sys.executable, "-m", "terrafm.train.launch", "--standalone", f"--nproc_per_node={args.nproc}",
           "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
           "-m", "terrafm.cli", "pretrain", "--config", args.config]
    if args.out:
        cmd += ["--out", args.out]
    if args.resume:
        cmd.append("--resume")
    if args.resume_from:
        cmd += ["--resume-from", args.resume_from]
    return cmd + list(args.overrides)


def _run_folder_keys(overrides: list[str]) -> list[str]:
    """The overrides that name the run folder (train.out_dir, train.run_name), which --out names too."""
    keys = []
    for item in overrides:
        train = parse_override(item).get("train")
        if isinstance(train, dict):
            keys += [f"train.{k}" for k in ("out_dir", "run_name") if k in train]
    return keys


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, list(args.overrides), nproc=args.nproc)
    except ConfigError as err:
        print(f"terrafm pretrain: configuration error: {err}", file=sys.stderr)
        return 2
    if args.out is not None and not args.out.strip():
        print("terrafm pretrain: configuration error: --out is empty; give the run folder", file=sys.stderr)
        return 2
    if args.resume_from is not None and not args.resume_from.strip():  # an unset $CKPT: not a fresh run
        print("terrafm pretrain: configuration error: --resume-from is empty (an unset variable?); give the "
              "checkpoint, or leave the option out for a fresh run", file=sys.stderr)
        return 2
    clash = _run_folder_keys(args.overrides) if args.out else []
    if clash:  # --out would silently win over them
        print(f"terrafm pretrain: configuration error: --out {args.out} and {', '.join(clash)} both name the run "
              "folder; give one of them (the SLURM scripts pass --out: set RUN_DIR)", file=sys.stderr)
        return 2
    if args.out:  # a path, verbatim: as an override it would be parsed as YAML (runs/2024 -> an integer)
        out = Path(args.out)
        if out.name in ("", ".", ".."):  # ".", "..", "a/..": the folder they name (its name: train.run_name)
            out = Path(os.path.abspath(out))
        if not out.name:
            print(f"terrafm pretrain: configuration error: --out {args.out} is the file system's root; give a run "
                  "folder", file=sys.stderr)
            return 2
        cfg.train.out_dir, cfg.train.run_name = str(out.parent), out.name
    if args.print_config:
        from terrafm.config import dump_yaml

        print(dump_yaml(cfg))
        return 0
    if args.nproc > 1 and "RANK" not in os.environ:
        from terrafm import backends
        from terrafm.train.parallelize import check_gpus_per_node, mesh_shape

        try:  # here, once, not as a message per rank and torchrun's ChildFailedError traceback
            mesh_shape(cfg.parallel.dp_replicate, cfg.parallel.dp_shard, args.nproc, args.nproc)
            if cfg.train.device == "cuda" or (cfg.train.device == "auto" and backends.cuda().usable):
                check_gpus_per_node(args.nproc)
        except ValueError as err:
            print(f"terrafm pretrain: configuration error: --nproc {args.nproc}: {err}", file=sys.stderr)
            return 2
        # exec, not a child process: signals (SIGTERM, SLURM's SIGUSR1) reach torchrun directly; one that arrived
        # while this command started goes to the ranks, which replay it (stop after the first step)
        stop_signals.hand_on(os.environ)
        cmd = _torchrun_command(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(cmd[0], cmd)

    from terrafm.train.checkpoint import has_checkpoints  # torch: imported once a run is about to start

    if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank torchrun started
        stop_signals.stop_when_orphaned()
    resume = args.resume_from or args.resume
    if args.resume and has_checkpoints(Path(cfg.train.out_dir) / cfg.train.run_name / "checkpoints"):
        # a requeued job continues its own run (also one killed before its first `latest`); --resume-from started it
        resume = True
    return end_of_rank(train_exit_code(cfg, resume), program=getattr(args, "as_program", False))


def _where_to_resume(cfg) -> str:
    latest = Path(cfg.train.out_dir) / cfg.train.run_name / "checkpoints" / "latest"
    return (f"{latest} names the last complete checkpoint (--resume continues from it)" if latest.is_file() else
            "no checkpoint was completed (--resume starts the run over)")


# What gloo and NCCL raise when a peer rank is gone or silent: a killed or stopped rank, a lost node, a timeout.
COLLECTIVE_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "timed out after",
                       "NCCL communicator was aborted", "NCCL error")


def collective_failure(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because of another rank (torch's DistError, or gloo's and NCCL's
    RuntimeErrors naming a lost peer or a timeout), not this rank's own fault."""
    import torch.distributed as dist

    return isinstance(err, getattr(dist, "DistError", ())) or any(text in str(err) for text in COLLECTIVE_FAILURES)


def end_of_rank(code: int, program: bool = False) -> int:
    """Return `code`, or, in a rank of a multi-rank torchrun job or in the `terrafm pretrain` process itself
    (program), end the process with it here, skipping the interpreter's finalization (output flushed first; the
    run's files are closed by then). A library call (main([...]) from Python, the tests) gets the code back.

    A thread that is inside a torch op (any pybind11 call that released the GIL) while the interpreter
    finalizes is killed with pthread_exit from a destructor, which aborts the whole process: "terminate called
    without an active exception" (pytorch/pytorch#38228; tests/train/test_rank_exit.py reproduces it with a
    daemon thread). Ranks of 2-rank CPU runs died so after their last checkpoint in about 1 CI run in 3, and
    torchrun then failed the job; single-process runs printed their message, then died so with exit 134 in about
    1 run in 20 of a refused resume. Finalization has nothing left to do for a rank that has returned: its
    checkpoints are written, its metrics and TensorBoard files closed and its process group destroyed."""
    if program or ("RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code


def train_exit_code(cfg, resume, loader=None) -> int:
    """Run the trainer and map its outcome to the exit code: 2 setup/config error, 1 training error, requeue when
    preempted, else 0 (one message, no traceback)."""
    from terrafm.stop_signals import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE
    from terrafm.train.trainer import SetupError, TrainingError, train

    try:
        result = train(cfg, resume=resume, loader=loader)
    except (SetupError, ConfigError) as err:
        print(f"terrafm pretrain: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"terrafm pretrain: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once; a checkpoint being written is left as .tmp
        print(f"terrafm pretrain: interrupted; {_where_to_resume(cfg)}", file=sys.stderr)
        return INTERRUPT_EXIT_CODE
    except RuntimeError as err:  # torch.OutOfMemoryError on CUDA; a plain RuntimeError from the CPU allocator
        if collective_failure(err):
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            print(f"terrafm pretrain: a collective with the other ranks failed ({first}): another rank died, was "
                  f"stopped, or did not answer within train.collective_timeout_s={cfg.train.collective_timeout_s} s "
                  f"(its own message, if any, is above); {_where_to_resume(cfg)}", file=sys.stderr)
            return 1
        if not out_of_memory(err):
            raise
        print(f"terrafm pretrain: out of memory ({str(err).strip().splitlines()[0]}); lower data.batch_size or the "
              "model and head sizes (model.name, model.img_size, ssl.num_prototypes, ssl.head_hidden_dim)",
              file=sys.stderr)
        return 2
    return REQUEUE_EXIT_CODE if result.preempted else INTERRUPT_EXIT_CODE if result.interrupted else 0
