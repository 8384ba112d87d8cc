"""Host memory that a CPU train step reuses instead of mapping afresh every step.

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
"""

from __future__ import annotations

import ctypes

from absl import flags

_RETAIN_HOST_MEMORY = flags.DEFINE_bool(
    "retain_host_memory", False, "glibc: keep freed host memory for reuse, so that a CPU "
    "step does not map and fault in its temporaries afresh every step; resident memory "
    "then only grows, by multiples of the step's temporaries and without a bound "
    "(efficient_vit/host_memory.py).")
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
  return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def retain_freed_memory() -> bool:
  """Applies `SETTINGS` with glibc's `mallopt`; returns False where there is no glibc."""
  libc = _glibc()
  if libc is None:
    return False
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  libc.gnu_get_libc_version.restype = ctypes.c_char_p
  for parameter, value in SETTINGS:
    if libc.mallopt(parameter, value) != 1:
      raise OSError(f"mallopt({parameter}, {value}) was refused by glibc "
                    f"{libc.gnu_get_libc_version().decode()}")
  return True


def retain_if_flagged() -> bool:
  """`retain_freed_memory` if `--retain_host_memory` was given: the first call of every
  `main` that runs train steps. Returns whether the settings took effect."""
  return _RETAIN_HOST_MEMORY.value and retain_freed_memory()
