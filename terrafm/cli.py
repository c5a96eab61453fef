"""`terrafm` command line: one subcommand per job, each implemented in its own module.

Each module named in COMMANDS defines `add_arguments(parser)` and `run(args) -> int`; it is imported
only when its subcommand runs, so `terrafm --help` stays fast and a missing optional dependency of
one job never breaks another.
"""

import argparse
import errno
import importlib
import os
import sys
import warnings
from functools import partial

COMMANDS = {
    "info": ("terrafm.info", "versions and which accelerated backends are usable here, and why not"),
    "prepare": ("terrafm.data.prepare", "convert Major-TOM parquet shards or GeoTIFF folders into terrafm shards"),
    "pretrain": ("terrafm.train.cli", "self-supervised pretraining (default: tiny_cpu config on the sample tiles)"),
    "export": ("terrafm.train.export", "write a checkpoint's backbone as one safetensors file (published layout)"),
    "eval": ("terrafm.eval.cli", "kNN, linear and segmentation probes on frozen features"),
    "bench": ("terrafm_bench.cli", "benchmark suite: kernels, memory, training step, data path, roofline, compile "
              "report, comm model"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="terrafm",
        description="TerraFM pretraining engine. Run `terrafm COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # `terrafm ... > file` on a full disk fails here, not silently at exit
        return code
    except BrokenPipeError:  # `terrafm ... | head`: the reader stopped reading; no traceback for that
        _discard_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe
    except OSError as err:  # a full disk or quota that no command handled itself: one message, exit 2
        if err.errno == errno.ENAMETOOLONG:  # a path a command was given, before the command could check it
            name = os.fsdecode(err.filename) if err.filename is not None else str(err)
            print(f"terrafm: file name too long: {name[:300]}{'...' if len(name) > 300 else ''} (a name of more than "
                  "255 bytes or a path of more than 4096, the usual limits); choose a shorter one", file=sys.stderr)
            return 2
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _discard_stdout()
        print(f"terrafm: {err.strerror} writing {err.filename or 'the output'}; free some space and rerun",
              file=sys.stderr)
        return 2


def _discard_stdout() -> None:
    """Point stdout at /dev/null so that Python's own flush at exit does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _main(argv: list[str] | None) -> int:
    program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        from terrafm import __version__

        print(f"terrafm {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module_name, help_text = COMMANDS[name]
    if program and name == "pretrain":  # before torch is imported: a stop signal then must not kill the run
        from terrafm import stop_signals

        stop_signals.record()
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"terrafm {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_intermixed_args(rest)  # overrides may come before and after options
    args.as_program = program  # the `terrafm` process itself, not main([...]) called from Python
    with warnings.catch_warnings():  # restores showwarning after the command
        if program:  # not under a caller's own warning capture (pytest.warns, catch_warnings(record=True))
            warnings.showwarning = partial(_show_warning, f"terrafm {name}", warnings.showwarning)
        return int(module.run(args) or 0)


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _show_warning(prog: str, default, message, category, filename, lineno, file=None, line=None) -> None:
    """terrafm's own warnings as `terrafm CMD: warning: ...` (they are messages to the user, not a source line
    and a class name); other libraries' keep Python's format."""
    if not os.path.abspath(filename).startswith(PACKAGE_DIR + os.sep):
        return default(message, category, filename, lineno, file, line)
    print(f"{prog}: warning: {message}", file=file or sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
