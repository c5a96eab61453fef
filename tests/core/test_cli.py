"""`terrafm --help` and `terrafm info` work on a fresh CPU machine and say why backends are off."""

import json
import subprocess
import sys

import pytest

from terrafm import backends
from terrafm.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_info_json_reports_every_backend_with_a_reason():
    proc = subprocess.run([sys.executable, "-m", "terrafm.cli", "info", "--json"], capture_output=True,
                          text=True, check=True)
    info = json.loads(proc.stdout)
    assert set(info["backends"]) == set(backends.ALL)
    for name, entry in info["backends"].items():
        assert entry["detail"], name
    assert info["versions"]["torch"].startswith("2.13.0")
    assert info["ops"]["patch_embed"]["cpu"] == "torch"


def test_unknown_command_fails_clearly(capsys):
    with pytest.raises(SystemExit) as err:  # a try/except let a main() that returned (0 or not) pass
        main(["pretrian"])
    assert err.value.code == 2
    assert "unknown command 'pretrian'" in capsys.readouterr().err


def test_backends_never_raise():
    for fn in backends.ALL.values():
        avail = fn()
        assert isinstance(avail.usable, bool) and isinstance(avail.detail, str)


def test_a_reader_that_stops_reading_gets_no_traceback():
    """`terrafm info | head -0`: the pipe is closed before terrafm writes; it exits 141 (SIGPIPE's code) quietly."""
    proc = subprocess.Popen([sys.executable, "-m", "terrafm.cli", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # closed while the child is still importing torch, long before its first print
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_overrides_may_come_before_and_after_options(capsys, tmp_path):
    """`terrafm pretrain a=1 --out X b=2`: argparse's plain parse_args rejected the second group."""
    from terrafm.cli import main

    assert main(["pretrain", "train.max_steps=3", "--out", str(tmp_path / "run"), "data.batch_size=4",
                 "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3" in out and "batch_size: 4" in out


def test_terrafm_warnings_print_as_one_message_line(capsys):
    """They printed as `/path/terrafm/eval/runner.py:155: UserWarning: ...` plus the source line of the call."""
    import functools

    from terrafm import cli
    from terrafm.eval import data

    shown_by_python = []
    show = functools.partial(cli._show_warning, "terrafm eval", lambda *args: shown_by_python.append(args[2]))
    show(UserWarning("the dataset's s2_l1c band B09 has mean 9"), UserWarning, data.__file__, 723)
    assert capsys.readouterr().err == "terrafm eval: warning: the dataset's s2_l1c band B09 has mean 9\n"
    show(UserWarning("another library's"), UserWarning, "/usr/lib/python3/site-packages/x.py", 5)
    assert shown_by_python == ["/usr/lib/python3/site-packages/x.py"] and not capsys.readouterr().err


def test_the_terrafm_process_prints_its_warnings_that_way():
    """The formatter is installed by `terrafm` itself (not by main([...]) called from Python, whose caller may
    capture warnings): a warning raised from inside the package by a command prints as one line."""
    import subprocess
    import sys

    code = ("import sys, warnings\n"
            "import terrafm.info as info\n"
            "def run(args):\n"
            "    warnings.warn_explicit('the shard index lists 3 records', UserWarning, info.__file__, 1)\n"
            "    return 0\n"
            "info.run = run\n"
            "from terrafm.cli import main\n"
            "sys.argv = ['terrafm', 'info']\n"
            "sys.exit(main())\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr == "terrafm info: warning: the shard index lists 3 records\n", run.stderr


def test_the_nproc_relaunch_is_a_command_torchrun_parses_with_the_stop_timeout():
    """torchrun's default --shutdown-timeout (30 s) SIGKILLed ranks still writing their stop checkpoint."""
    import argparse

    from torch.distributed.run import get_args_parser

    from terrafm.train.cli import SHUTDOWN_TIMEOUT_S, _torchrun_command, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--nproc", "2", "--out", "runs/x", "optim.lr=0.001"])
    cmd = _torchrun_command(args)
    assert cmd[1:3] == ["-m", "terrafm.train.launch"]
    parsed = get_args_parser().parse_args(cmd[3:])  # after "python -m terrafm.train.launch", which is torchrun
    assert parsed.shutdown_timeout == SHUTDOWN_TIMEOUT_S == 110 and parsed.nproc_per_node == "2"
    assert "SIGUSR1" in parsed.signals_to_handle and parsed.training_script == "terrafm.cli" and parsed.module
    assert parsed.training_script_args[-3:] == ["--out", "runs/x", "optim.lr=0.001"]
