"""One run per workdir: an exclusive lock on `WORKDIR/run.lock`, held while a run writes.

The lock is the kernel's (`fcntl.flock` on the open file), so it goes with its process: a
run killed with SIGKILL, or on a machine that died, holds nothing, and the next launch
takes it over without any timeout. The file names its holder (pid, host, start time) for
the one-line refusal a second launch gets while the first lives. On a file system without
working locks (flock refused with ENOLCK / EOPNOTSUPP) the file itself is the lock: a
holder on this host whose pid is gone is stale and taken over; one on another host is
refused (remove the file by hand once that run is known dead).

Under several processes process 0 holds the lock for the run (train.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

LOCK_NAME = "run.lock"


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir."""


def _holder(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _describe(workdir: str, holder: dict) -> str:
  who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since "
         f"{holder.get('started', '?')}" if holder else "a process that has not written "
         "its name yet")
  return (f"workdir {workdir} is in use by another run ({who}); wait for it to end, or "
          "use another --workdir")


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, TypeError, ValueError):
    return True
  return True


class RunLock:
  """`with RunLock(workdir):` holds the workdir's lock (creating the workdir if needed) or
  raises `WorkdirBusy` naming the holder. On release the lock file is removed, and so is
  the workdir when the lock created it and nothing else was written there."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self._fd: int | None = None
    self._created_workdir = False

  def __enter__(self) -> RunLock:
    self._created_workdir = not os.path.exists(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    try:
      self._acquire()
    except BaseException:
      self._remove_created_workdir()
      raise
    return self

  def _acquire(self) -> None:
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise WorkdirBusy(_describe(self.workdir, _holder(self.path))) from None
      except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
          raise
        self._acquire_without_flock()
        return
      # The file may have been removed by a holder releasing it between our open and our
      # flock: then this lock is on a file nobody else sees. Retry on the current one.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        self._fd = fd
        self._write_holder()
        return
      os.close(fd)

  def _acquire_without_flock(self) -> None:
    holder = _holder(self.path)
    if holder and (holder.get("host") != socket.gethostname()
                   or _pid_alive(holder.get("pid"))):
      raise WorkdirBusy(_describe(self.workdir, holder))
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.path)  # Stale: its process on this host is gone.
    try:
      self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # Another launch took it in between.
      raise WorkdirBusy(_describe(self.workdir, _holder(self.path))) from None
    self._write_holder()

  def _write_holder(self) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps(record).encode(), 0)

  def __exit__(self, *exc) -> None:
    if self._fd is None:
      return
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.path)  # Before unlocking: a waiting launch retries on a new file.
    os.close(self._fd)
    self._fd = None
    self._remove_created_workdir()

  def _remove_created_workdir(self) -> None:
    if self._created_workdir:
      with contextlib.suppress(OSError):
        os.rmdir(self.workdir)  # Only when empty: a run that stopped before writing.
