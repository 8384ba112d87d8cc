"""`host_memory.retain_freed_memory`: a large buffer freed by a worker thread is reused by
the next allocation instead of being mapped and faulted in again."""

import json
import os
import subprocess
import sys

import pytest

from efficient_vit import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64 << 20  # Above glibc's largest mmap threshold (32 MB): mmapped by default.
# A worker thread (as XLA's) allocates, writes and frees the buffer three times; printed:
# the minor page faults of each round.
PROGRAM = f"""
import ctypes, json, resource, sys, threading
from efficient_vit import host_memory
applied = host_memory.retain_freed_memory() if sys.argv[1] == "retain" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
def step():
  for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    buffer = libc.malloc({SIZE})
    ctypes.memset(buffer, 1, {SIZE})
    libc.free(buffer)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=step)
thread.start()
thread.join()
print(json.dumps({{"applied": applied, "faults": faults}}))
"""


def _faults(mode: str) -> dict:
  out = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out)


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only")
def test_a_freed_buffer_is_reused_without_page_faults():
  pages = SIZE // os.sysconf("SC_PAGE_SIZE")
  system = _faults("system")
  retained = _faults("retain")
  assert retained["applied"] is True
  # glibc's default: every round maps the buffer afresh and faults in its pages (unless
  # transparent huge pages back it, which this check then cannot see).
  if min(system["faults"]) < pages // 2:
    pytest.skip(f"default allocator faulted {system['faults']} times for {pages} pages")
  # Retained: the first round faults the heap in, the next ones reuse it.
  assert retained["faults"][0] >= pages // 2
  assert max(retained["faults"][1:]) < pages // 100, retained


# Run as a program: restarts itself for huge pages (when asked), then mallocs,
# writes and keeps a buffer; printed once per start: the PID and GLIBC_TUNABLES, then
# whether the buffer's mapping may take transparent huge pages and how many kB it got.
RESTARTING = f"""
import ctypes, json, os, sys
from absl import app
from efficient_vit import host_memory

def huge_kb():
  with open("/proc/self/smaps_rollup") as f:
    return sum(int(line.split()[1]) for line in f if line.startswith("AnonHugePages"))

def eligible(address):  # The kernel's THPeligible flag of the mapping holding `address`.
  inside = False
  with open("/proc/self/smaps") as f:
    for line in f:
      first = line.split()[0]
      if "-" in first and ":" not in first:
        start, end = (int(part, 16) for part in first.split("-"))
        inside = start <= address < end
      elif inside and first == "THPeligible:":
        return line.split()[1] == "1"

def main(argv):
  print(json.dumps({{"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"),
                    "restarting": True}}), flush=True)
  host_memory.restart_with_huge_pages(argv[1])
  libc = ctypes.CDLL(None)
  libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
  before = huge_kb()
  buffer = libc.malloc({SIZE})
  ctypes.memset(buffer, 1, {SIZE})
  print(json.dumps({{"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"),
                    "huge_kb": huge_kb() - before, "eligible": eligible(buffer),
                    "on": host_memory.huge_pages_on()}}), flush=True)

app.run(main)
"""


def _starts(*args: str, tunables: str | None = None) -> list[dict]:
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run([sys.executable, "-c", RESTARTING, *args], cwd=ROOT, check=True,
                       capture_output=True, text=True, env=env).stdout
  return [json.loads(line) for line in out.splitlines()]


@pytest.mark.skipif(not host_memory.huge_pages_available(),
                    reason="needs glibc 2.35+ and transparent huge pages not 'never'")
def test_the_program_restarts_once_with_malloc_on_huge_pages():
  first, again, done = _starts("__main__", "--host_huge_pages")  # One restart, no loop.
  assert first["pid"] == again["pid"] == done["pid"]  # execve: the same process.
  assert first["tunables"] is None and done["tunables"] == "glibc.malloc.hugetlb=1"
  # The buffer's mapping is advised for huge pages (whether the kernel found free ones
  # at that moment is its business: `huge_kb` says, and is not asserted).
  assert done["on"] and done["eligible"], done
  # Other tunables are kept.
  *_, done = _starts("__main__", "--host_huge_pages", tunables="glibc.malloc.check=0")
  assert done["tunables"] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1"


@pytest.mark.skipif(not host_memory.huge_pages_available(),
                    reason="needs glibc 2.35+ and transparent huge pages not 'never'")
@pytest.mark.parametrize("args, tunables", [
    (("imported_module", "--host_huge_pages"), None),  # main() called by other code.
    (("__main__",), None),  # Off unless asked for.
    (("__main__", "--host_huge_pages"), "glibc.malloc.hugetlb=0"),  # The user's choice.
])
def test_no_restart_when_not_the_entry_point_or_not_asked(args, tunables):
  starts = _starts(*args, tunables=tunables)
  assert len(starts) == 2, starts  # The first line, then the buffer's: no second start.
  assert starts[1]["tunables"] == tunables
  assert starts[1]["on"] is False, starts
  with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
    if "[madvise]" in f.read():  # With `always` every mapping is eligible unasked.
      assert starts[1]["eligible"] is False and starts[1]["huge_kb"] == 0, starts
