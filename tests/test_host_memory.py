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
