"""The command loop both benchmark workers speak (`peer_worker.py`, `checkout_worker.py`):
one JSON object per line on stdin, one reply per line on stdout. Standard library only, as
`peer_worker.py` runs in the peers' environments.

  {"op": "setup", "spec": {...}}  `setup(spec)` builds the step -> {"ok": true, "setup_s":
                                  ..., **the fields setup returns beside its run function}
  {"op": "run", "steps": N}       -> {"ok": true, "seconds": run(N)}
  {"op": "quit"}                  -> {"ok": true}, and the loop ends.
A failure answers {"ok": false, "error": "..."}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

Run = Callable[[int], float]


def serve(setup: Callable[[dict], tuple[Run, dict]]) -> None:
  """Answers commands until "quit" or the end of stdin."""
  # The protocol gets the real stdout; whatever the libraries print goes to stderr.
  protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  run = None
  for line in sys.stdin:
    request = json.loads(line)
    try:
      if request["op"] == "setup":
        start = time.perf_counter()
        run, fields = setup(request["spec"])
        reply = {"ok": True, "setup_s": time.perf_counter() - start, **fields}
      elif request["op"] == "run":
        if run is None:
          raise RuntimeError("run before setup")
        reply = {"ok": True, "seconds": run(int(request["steps"]))}
      elif request["op"] == "quit":
        protocol.write(json.dumps({"ok": True}) + "\n")
        return
      else:
        raise ValueError(f"op={request['op']!r}; allowed: setup, run, quit")
    except Exception as e:  # pylint: disable=broad-except
      reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    protocol.write(json.dumps(reply) + "\n")
