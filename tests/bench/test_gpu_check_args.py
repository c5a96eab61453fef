"""scripts/gpu_check.sh's arguments, with a stand-in Python (no stage runs): bad values exit 2 before any work,
and OUT_DIR, --work and PYTHON are taken relative to the caller's folder, not the checkout's."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FAKE_PYTHON = '#!/bin/bash\necho "$*" >> "$FAKE_PYTHON_LOG"\n'


def _run(cwd: Path, *args: str, python: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "FAKE_PYTHON_LOG": str(cwd / "python.log"), "LC_ALL": "C"}  # mkdir's reasons in English
    env.pop("PYTHON", None)
    if python:
        env["PYTHON"] = python
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env=env)


def _fake_python(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def test_a_budget_that_is_not_whole_seconds_exits_2_naming_it(tmp_path):
    for budget in ("abc", "10.5", "-5", ""):  # were: a bash error and exit 1 ("abc: unbound variable")
        proc = _run(tmp_path, "--budget", budget, "--stages", "env", str(tmp_path / "out"),
                    python=str(_fake_python(tmp_path)))
        assert proc.returncode == 2, (budget, proc.stderr)
        assert "--budget" in proc.stderr and not (tmp_path / "python.log").exists()


def test_a_budget_with_a_leading_zero_is_decimal_seconds(tmp_path):
    """--budget 08 was a bash error (08 read as octal) and the stages ran with no budget."""
    proc = _run(tmp_path, "--budget", "0090", "--stages", "env", str(tmp_path / "out"),
                python=str(_fake_python(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert "budget 90 s" in proc.stdout and "stage env" in (tmp_path / "python.log").read_text()


def test_out_work_and_python_are_relative_to_the_callers_folder(tmp_path):
    """`cd /scratch && bash ~/terrafm/scripts/gpu_check.sh results` used to write into the checkout."""
    name, work = f"gpu-check-out-{os.getpid()}", f"gpu-check-work-{os.getpid()}"
    _fake_python(tmp_path / "venv")
    try:
        proc = _run(tmp_path, "--stages", "env", "--work", work, name, python="venv/python")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / name / "gpu_check.log").is_file() and (tmp_path / work / "stages").is_dir()
        assert not (ROOT / name).exists() and not (ROOT / work).exists()
        calls = (tmp_path / "python.log").read_text()
        assert "stage env" in calls and f"--out {tmp_path / name}" in calls
    finally:
        shutil.rmtree(ROOT / name, ignore_errors=True)
        shutil.rmtree(ROOT / work, ignore_errors=True)


def test_an_out_dir_that_cannot_be_written_exits_2_before_any_stage(tmp_path):
    """An existing folder the user cannot write used to be found out only when the report failed at the end."""
    proc = _run(tmp_path, "--stages", "env", "/proc", python=str(_fake_python(tmp_path)))
    assert proc.returncode == 2, proc.stderr
    assert "cannot write /proc/gpu_check.log" in proc.stderr and not (tmp_path / "python.log").exists()


def test_a_budget_of_no_seconds_or_too_many_exits_2(tmp_path):
    """--budget 0 ran and exited 1 ("the budget of 0 s is spent"); a 20-digit budget wrapped around in bash's
    arithmetic and was accepted."""
    for budget in ("0", "000", "86401", "99999999999999999999", "18446744073709551617"):
        proc = _run(tmp_path, "--cpu", "--budget", budget, "--stages", "summary", str(tmp_path / "out"),
                    python=str(_fake_python(tmp_path)))
        assert proc.returncode == 2, (budget, proc.stdout, proc.stderr)
        assert proc.stderr == f"gpu_check: --budget takes whole seconds from 1 to 86400, got '{budget}'\n"
        assert not (tmp_path / "python.log").exists() and not (tmp_path / "out").exists()
    proc = _run(tmp_path, "--budget", "86400", "--stages", "env", str(tmp_path / "out"),
                python=str(_fake_python(tmp_path)))
    assert proc.returncode == 0 and "budget 86400 s" in proc.stdout, proc.stderr


def test_stages_that_name_no_stage_exit_2(tmp_path):
    """--stages , selected nothing and exited 0; --stages "" fell back to every stage."""
    for stages in (",", "", " , ,"):
        proc = _run(tmp_path, "--cpu", "--budget", "3", "--stages", stages, str(tmp_path / "out"),
                    python=str(_fake_python(tmp_path)))
        assert proc.returncode == 2, (stages, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("gpu_check: --stages names no stage; choose from env,build,")
        assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "python.log").exists()


def test_stages_may_be_separated_by_commas_and_blanks(tmp_path):
    """`--stages "env, summary"` ran env only: " summary" matched no stage in the loop and was not refused."""
    proc = _run(tmp_path, "--stages", "env, summary", str(tmp_path / "out"), python=str(_fake_python(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    calls = (tmp_path / "python.log").read_text()
    assert "stage env" in calls and "stage summary" in calls and "--selected env,summary" in calls


def test_a_file_where_a_folder_should_go_is_one_message(tmp_path):
    """--work FILE printed two `mkdir: cannot create directory` lines."""
    (tmp_path / "f").write_text("x")
    python = str(_fake_python(tmp_path / "venv"))
    for args, message in (
        (("--work", "f", "out"), "gpu_check: --work f is a file, not a folder\n"),
        (("--work", "", "out"), "gpu_check: --work is empty; give a folder for the scratch files\n"),
        (("f",), "gpu_check: OUT_DIR f is a file, not a folder\n"),
        (("--work", "f/sub", "out"), "gpu_check: cannot create the --work folder f/sub (Not a directory)\n"),
        (("f/sub",), "gpu_check: cannot create OUT_DIR f/sub (Not a directory)\n"),
    ):
        proc = _run(tmp_path, "--stages", "env", *args, python=python)
        assert (proc.returncode, proc.stderr) == (2, message), args
        assert not (tmp_path / "python.log").exists() and (tmp_path / "f").read_text() == "x"


def test_a_python_that_cannot_run_exits_2_before_any_stage(tmp_path):
    """PYTHON=/no/such/python ran every stage (each "failed to run command"), then the report failed: exit 1."""
    (tmp_path / "not-a-program").write_text("x")
    for python, shown in ((str(tmp_path / "missing"), str(tmp_path / "missing")),
                          ("./not-a-program", f"{tmp_path}/./not-a-program"), ("no-such-python-9", "no-such-python-9")):
        proc = _run(tmp_path, "--stages", "env,summary", "out", python=python)
        assert (proc.returncode, proc.stderr) == (2, f"gpu_check: PYTHON {shown} is not a program that can be run; "
                                                     "give an interpreter's path or leave PYTHON unset\n"), python
        assert not (tmp_path / "out").exists()


def test_help_exits_0_with_the_options_and_stage_names(tmp_path):
    """--help printed only the usage line, to stderr, and exited 2 (the bad-arguments code)."""
    proc = _run(tmp_path, "--help", python=str(_fake_python(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    for text in ("usage: bash scripts/gpu_check.sh", "--budget SECONDS", "kernel_timing", "PYTHON"):
        assert text in proc.stdout, text
    assert not (tmp_path / "python.log").exists()


def test_a_stage_cut_to_the_budget_leaves_data_and_summary_what_they_need(tmp_path):
    """train_step (whose step benchmark fills its limit) left data 15 s of the 20 s it took on an H200: with
    the default budget the data stage timed out and the run failed."""
    proc = _run(tmp_path, "--budget", "100", "--stages", "train_step,data,summary", str(tmp_path / "out"),
                python=str(_fake_python(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    stages = [line.split() for line in (tmp_path / "python.log").read_text().splitlines() if " stage " in line]
    calls = {words[3]: int(words[words.index("--budget") + 1]) for words in stages}
    assert calls["train_step"] in (59, 60), calls  # 100 - 30 (data) - 10 (summary)
    assert calls["data"] >= 30, calls


def test_the_default_gpu_budget_fits_the_measured_stages_in_a_600_s_command():
    text = SCRIPT.read_text()
    default = int(text.split("BUDGET=${BUDGET:-", 1)[1].split("}", 1)[0])
    assert 475 + 30 <= default <= 600 - 30  # the H200's stages (docs/bench.md), the report after them


@pytest.mark.parametrize(("signum", "whole_group", "during"), [
    (signal.SIGINT, True, "stage env"), (signal.SIGTERM, False, "stage env"), (signal.SIGINT, True, "report")])
def test_ctrl_c_or_sigterm_stops_the_stage_and_writes_the_report(tmp_path, signum, whole_group, during):
    """Each stage runs under timeout in its own process group: a terminal's Ctrl-C (to the foreground group) or a
    SIGTERM to the script left the stage running to its limit, then the next stage ran; a Ctrl-C while the report
    was written failed it (exit 130 of the report, no report)."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON + f'case "$*" in *"{during}"*) echo $$ > "$FAKE_PYTHON_LOG.pid"; sleep 3; '
                      'echo finished >> "$FAKE_PYTHON_LOG" ;; esac\n')
    python.chmod(0o755)
    env = {**os.environ, "FAKE_PYTHON_LOG": str(tmp_path / "python.log"), "PYTHON": str(python)}
    proc = subprocess.Popen(["bash", str(SCRIPT), "--stages", "env,summary", str(tmp_path / "out")], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        pid_file = tmp_path / "python.log.pid"
        for _ in range(200):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            time.sleep(0.05)
        if whole_group:
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, (out, err)
    assert err == f"gpu_check: interrupted; {tmp_path / 'out'}/gpu_report.md has the stages run before it\n"
    calls = [" ".join(line.split()[:4]) for line in (tmp_path / "python.log").read_text().splitlines()]
    if during == "report":  # finished: the signal waited for it
        assert calls[1:] == ["-m terrafm_bench.gpu_check stage summary", "-m terrafm_bench.gpu_check report --work",
                             "finished"]
    else:  # stopped at once, no stage after it, then the report
        assert calls == ["-m terrafm_bench.gpu_check stage env", "-m terrafm_bench.gpu_check report --work"]
        assert "== summary: not run, the check was interrupted" in out
