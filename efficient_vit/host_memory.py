"""Host memory for CPU train steps: on huge pages or kept for reuse, both opt-in flags.

XLA's CPU client allocates a step's temporaries as one buffer per execution (2.25 GB for
ViT-S/16 at batch 16) and frees it when the step ends. glibc serves an allocation that
large from a thread's arena with `mmap` and gives it back with `munmap` on `free`, so the
next step maps it again and the kernel zeroes and faults in every page: 640,000 minor page
faults and about 2 s of system time per ViT-S/16 step on a 2-core CPU (a fifth of the
step's CPU time), and slower user code on the fresh pages. `retain_freed_memory` sets three
of glibc's `mallopt` parameters so that the buffer stays in the process:

  M_ARENA_MAX = 1         every thread allocates from the main heap (`brk`), which can grow
                          to any size; a thread's own arena cannot hold a buffer larger
                          than its 64 MB heaps and would `mmap` it regardless of the rest
  M_MMAP_MAX = 0          no allocation is served by `mmap`
  M_TRIM_THRESHOLD = -1   freed memory at the top of the heap is never given back

The cost is host memory, and it is not bounded. The process's resident memory never
shrinks, and it grows in whole multiples of the step's temporaries, as when small
allocations made between two steps split the freed buffer so that the next step's no longer
fits in it. ViT-S/16 at batch 16 settled at 8.1 GB (3.9 GB without) a few steps in;
MobileViT-XXS at batch 16 (2.47 GB of temporaries) stayed at 4.5 GB for 14 steps in one
process but grew in others: 7.0 GB after 8 steps and 11.9 GB after 17; 11.9 GB after 8,
14.4 GB after 11 and 16.9 GB after 32; two such processes side by side were killed for
memory on a 24 GB machine. Compilation gets slower too (the compiler's threads contend for
the one arena: ViT-S/16's train step 9.3-10.7 s against 8.1-8.5 s). So it is off unless
asked for: `--retain_host_memory` (launch.py, the benchmarks; the flag is defined here, for
every entry point that imports this module) where the host has memory to spare and the
page faults cost much (ViT-S/16 steps of 3.4-3.6 s against 4.5-5.9 s on a 2-core AMD EPYC,
no page faults). Measured figures: `benchmarks/PROFILE.md`.

M_ARENA_MAX reaches only threads that have not allocated yet, so call it first thing in
`main`, before JAX or TensorFlow start their thread pools. It changes no result, only
where the host's memory comes from; without glibc (macOS, musl) it does nothing.

Huge pages (`--host_huge_pages`, opt-in, read by the benchmarks) make the faults cheap instead of avoiding them, with nothing
retained: glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35 and later) has `malloc`
advise the kernel to back its large mappings with transparent huge pages, so a step's fresh
temporaries fault in 2 MiB at a time instead of 4 KiB, and `free` still gives them back.
glibc reads its tunables only when a program starts, from the `GLIBC_TUNABLES` environment
variable, so `restart_with_huge_pages` starts the program again in the same process
(`os.execve`: same PID, same arguments) with the tunable added, as the first thing its
`main` does (the benchmarks'; `launch.py` never restarts: to train on huge pages, start it
with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` set). Only a program's own entry module
restarts (`python -m ...`); a `main` called from other code (a test, a notebook) never does, and neither does
a program whose `GLIBC_TUNABLES` already names the tunable (`glibc.malloc.hugetlb=0` keeps
4 KiB pages), nor one run without `--host_huge_pages`, nor a kernel whose transparent huge
pages are `never`. Child processes inherit the variable: `benchmarks/peers.py`'s timm and
Keras workers run with the same allocator. Gains, 2-core AMD EPYC with AVX-512, train
steps of `benchmarks/peers.py`'s rows alternated between two processes:
MobileViT-XXS 1.56x, ViT-S/16 1.30x, CCT 1.22x (`benchmarks/PROFILE.md`).
"""

from __future__ import annotations

import ctypes
import os
import sys

from absl import flags

_RETAIN_HOST_MEMORY = flags.DEFINE_bool(
    "retain_host_memory", False, "glibc: keep freed host memory for reuse, so that a CPU "
    "step does not map and fault in its temporaries afresh every step; resident memory "
    "then only grows, by multiples of the step's temporaries and without a bound "
    "(efficient_vit/host_memory.py).")
_HOST_HUGE_PAGES = flags.DEFINE_bool(
    "host_huge_pages", False, "Linux, glibc 2.35+: start the program again once with "
    "GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so that malloc backs large blocks (a CPU "
    "step's temporaries) with transparent huge pages and they fault in 2 MiB at a time "
    "(efficient_vit/host_memory.py).")
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
# <malloc.h>'s parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def _glibc() -> ctypes.CDLL | None:
  try:
    libc = ctypes.CDLL(None)
  except OSError:
    return None
  if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
    return None
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  libc.gnu_get_libc_version.restype = ctypes.c_char_p
  return libc


def retain_freed_memory() -> bool:
  """Applies `SETTINGS` with glibc's `mallopt`; returns False where there is no glibc."""
  libc = _glibc()
  if libc is None:
    return False
  for parameter, value in SETTINGS:
    if libc.mallopt(parameter, value) != 1:
      raise OSError(f"mallopt({parameter}, {value}) was refused by glibc "
                    f"{libc.gnu_get_libc_version().decode()}")
  return True


def retain_if_flagged() -> bool:
  """`retain_freed_memory` if `--retain_host_memory` was given: the first call of every
  `main` that runs train steps. Returns whether the settings took effect."""
  return _RETAIN_HOST_MEMORY.value and retain_freed_memory()


def huge_pages_available() -> bool:
  """Whether glibc can be told to use transparent huge pages: glibc 2.35 or later and a
  kernel whose transparent huge pages are `always` or `madvise`."""
  libc = _glibc()
  if libc is None:
    return False
  version = tuple(int(part) for part in
                  libc.gnu_get_libc_version().decode().split(".")[:2])
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
      mode = f.read()
  except OSError:
    return False
  return version >= (2, 35) and "[never]" not in mode


def _huge_pages_tunable() -> str | None:
  """The value `GLIBC_TUNABLES` gives glibc's huge-page tunable, None where it names none."""
  for item in os.environ.get("GLIBC_TUNABLES", "").split(":"):
    name, _, value = item.partition("=")
    if name == HUGE_PAGES_TUNABLE:
      return value
  return None


def huge_pages_on() -> bool:
  """Whether this process started with glibc's huge-page tunable set (to anything but 0)."""
  return _huge_pages_tunable() not in (None, "0")


def restart_with_huge_pages(module_name: str) -> None:
  """Starts the program again with `glibc.malloc.hugetlb=1` added to `GLIBC_TUNABLES`,
  where `--host_huge_pages` asks for it and it is not there yet: the first
  call of every `main` that runs train steps, given that module's `__name__`, which must be
  "__main__" (anything else returns at once). Does not return when it restarts."""
  if (module_name != "__main__" or not _HOST_HUGE_PAGES.value
      or _huge_pages_tunable() is not None or not huge_pages_available()):
    return
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  env = dict(os.environ,
             GLIBC_TUNABLES=":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE + "=1"))))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)
