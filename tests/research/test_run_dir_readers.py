"""Readers of a run directory take its lock: ``slimjax export RUN_DIR`` (exclusive, it writes
RUN_DIR/export) and ``load_run`` (shared: a distillation ``teacher_run``) are refused while a live
process runs in the directory, with the one-line "workdir W is in use by pid N" message."""

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from research import cli
from research import workdir as W

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HOLD = textwrap.dedent(
    """
    import sys
    from research.workdir import WorkdirLock
    lock = WorkdirLock(sys.argv[1], command="holder", shared=sys.argv[2] == "shared").acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes stdin
    lock.release()
    """
)


def _holder(workdir, mode="exclusive"):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir), mode],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _release(proc):
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def test_export_of_a_run_dir_in_use_is_refused_with_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    try:
        assert cli.main(["export", str(run_dir), "--to", "stablehlo"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"slimjax: workdir {run_dir} is in use by pid {proc.pid} on {socket.gethostname()}")
        assert "\n" not in err
        assert os.listdir(run_dir) == [".lock"]  # nothing exported, nothing read
    finally:
        _release(proc)


def test_load_run_takes_a_shared_lock(tmp_path):  # as DistillStage(teacher_run=...) does
    from research import run as run_lib

    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    try:
        with pytest.raises(W.WorkdirInUseError, match=f"in use by pid {proc.pid}.*before reading the run"):
            run_lib.load_run(str(run_dir))
    finally:
        _release(proc)
    # Free again: load_run gets past the lock (and says the directory holds no report).
    with pytest.raises(W.RunFileError, match="report.json"):
        run_lib.load_run(str(run_dir))
    assert (run_dir / ".lock").read_text() == ""  # a reader writes nothing
    with W.WorkdirLock(run_dir):  # this process holds it (slimjax export reading the run it exports)
        with pytest.raises(W.RunFileError, match="report.json"):
            run_lib.load_run(str(run_dir))


def test_readers_share_and_keep_writers_out(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    reader = _holder(run_dir, "shared")
    try:
        with W.WorkdirLock(run_dir, shared=True):  # a second reader is welcome
            pass
        with pytest.raises(W.WorkdirInUseError, match=r"in use by another process \(reading it\)"):
            W.WorkdirLock(run_dir).acquire()
    finally:
        _release(reader)
    with W.WorkdirLock(run_dir) as lock:  # the writer gets it once the reader is gone
        with W.WorkdirLock(run_dir, shared=True):  # and may read its own directory
            pass
        with pytest.raises(W.WorkdirInUseError, match=f"pid {os.getpid()}"):  # a second writer may not
            W.WorkdirLock(run_dir).acquire()
        assert lock.path == str(run_dir / ".lock")


def test_a_run_dir_the_reader_may_not_write_is_read_without_a_lock(tmp_path, monkeypatch):
    run_dir = tmp_path / "shared_run"
    run_dir.mkdir()
    real_open = os.open

    def read_only(path, flags, *args):  # another user's run: no lock file, and none may be created
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with W.WorkdirLock(run_dir, shared=True):
        assert not (run_dir / ".lock").exists()
    with W.WorkdirLock(tmp_path / "missing", shared=True):  # nothing to read: the reader reports it
        pass
    with pytest.raises(PermissionError):  # a writer needs the lock
        W.WorkdirLock(run_dir).acquire()
