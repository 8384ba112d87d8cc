"""One run per workdir (efficient_vit/run_lock.py): a second run is refused while the first
lives, naming it; the lock of a killed run is taken over; nothing is left behind. (Two real
launches on one workdir: tests/test_run_lifecycle.py.)"""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from efficient_vit import run_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLD = """
import sys, time
from efficient_vit import run_lock
with run_lock.RunLock(sys.argv[1]):
  print("held", flush=True)
  time.sleep(600)
"""


def _holder_process(workdir):
  """A real process that takes the lock and sleeps: returned once it holds it."""
  process = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == "held"
  return process


def test_a_second_lock_is_refused_naming_the_holder_and_release_cleans_up(tmp_path):
  workdir = tmp_path / "run"
  with run_lock.RunLock(workdir):
    holder = json.loads((workdir / run_lock.LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(run_lock.WorkdirBusy,
                       match=rf"is in use by another run \(pid {os.getpid()} on host "):
      with run_lock.RunLock(workdir):
        pass
    assert os.listdir(workdir) == [run_lock.LOCK_NAME]  # The refusal changed nothing.
  assert not workdir.exists()  # Created by the lock and left empty: removed with it.
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("")
  with run_lock.RunLock(workdir):
    pass
  assert os.listdir(workdir) == ["metrics.jsonl"]


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
  process = _holder_process(tmp_path)
  with pytest.raises(run_lock.WorkdirBusy, match=f"pid {process.pid} on host"):
    with run_lock.RunLock(tmp_path):
      pass
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert (tmp_path / run_lock.LOCK_NAME).exists()  # Left behind by the kill...
  with run_lock.RunLock(tmp_path):  # ...and taken over at once.
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_without_working_flock_a_dead_holder_on_this_host_is_stale(tmp_path, monkeypatch):
  def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_flock)
  lock_file = tmp_path / run_lock.LOCK_NAME
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  lock_file.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
  with run_lock.RunLock(tmp_path):  # Its pid is gone: taken over.
    with pytest.raises(run_lock.WorkdirBusy, match=f"pid {os.getpid()}"):
      with run_lock.RunLock(tmp_path):  # This process lives: refused.
        pass
  lock_file.write_text(json.dumps({"pid": int(dead.stdout), "host": "another-host"}))
  with pytest.raises(run_lock.WorkdirBusy, match="on host another-host"):
    with run_lock.RunLock(tmp_path):  # Another host's pid cannot be checked: refused.
      pass
