"""Pinning a server process to one CPU core.

A request crosses threads twice: the event loop hands it to the thread that answers it (digitkit.serve.app's
Batcher or Worker) and gets the answer back. Python runs one of those threads at a time (the GIL), so the process
gains little from a second core, while each hand-over between cores costs a wake-up of the other core: on the
2-vCPU virtual machine of issue 27, one PNG request took 2.89 ms p50 in-process with the process free to move and
1.62 ms pinned to one core (`benchmarks/serve_load.py --skip-http`, same minute). `digitkit serve` therefore pins
each worker process to one core (settings `pin_cpu: true`, the default), the workers spread over the cores the
server may use, one each in turn; single-worker servers of one user take turns machine-wide (`machine_turns`), so
two of them start on different cores. Linux only (os.sched_setaffinity); elsewhere nothing happens.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("digitkit.serve")

TURN_FILE = "digitkit-cpu-turns"
"""In the folder the workers share (the metrics folder of `digitkit serve --workers N`): how many have pinned."""


def pin_to_one_core(shared_dir: str | Path | None = None) -> int | None:
    """Pin this process to one of the cores it may run on, and return that core (None: not pinned: one core only,
    or no sched_setaffinity). Processes that share `shared_dir` take the cores in turn (a counter under a file
    lock); without it the first core is taken."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    turn = _next_turn(Path(shared_dir)) if shared_dir else 0
    core = cores[turn % len(cores)]
    try:
        os.sched_setaffinity(0, {core})
    except OSError as e:  # a container may refuse it: serving goes on unpinned
        log.warning("could not pin the server process to core %d (%s); it runs unpinned", core, e)
        return None
    return core


def machine_turns() -> Path:
    """Where single-worker servers of this user take turns: two `digitkit serve` on one machine then start on
    different cores (the temporary folder, one file per user)."""
    return Path(tempfile.gettempdir()) / f"digitkit-serve-{os.getuid()}"


def _next_turn(folder: Path) -> int:
    """This process's turn (0, 1, 2, ...) among those sharing `folder`; 0 when the counter cannot be kept."""
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        with open(folder / TURN_FILE, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            f.seek(0)
            text = f.read().decode("ascii", "replace").strip()
            turn = int(text) if text.isdigit() else 0
            f.seek(0)
            f.truncate()
            f.write(str(turn + 1).encode())
            return turn
    except OSError as e:
        log.debug("no CPU turn counter in %s (%s): the first core is taken", folder, e)
        return 0
