"""Reaping what a killed runner cannot stop: the processes a local Ray started for it.

A runner killed with SIGKILL runs no cleanup. Ray's raylet and workers then exit on their own, but
its DashboardAgent and RuntimeEnvAgent stay (measured with Ray 2.60), so a watchdog outside the
runner kills them once it is gone; the process executor's workers watch their parent themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

# the watchdog of a local Ray: waits for the runner to die, then kills the processes Ray started for it
_REAPER = """
import os, signal, sys, time, json
parent, procs = int(sys.argv[1]), json.loads(sys.argv[2])
def started(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None
while started(parent) == sys.argv[3]:
    time.sleep(0.5)
for pid, start in procs:
    if started(pid) == start:  # the same process, not a recycled pid
        os.kill(pid, signal.SIGKILL)
"""


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) from /proc (Linux); empty elsewhere."""
    table = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def descendants() -> list[tuple[int, str]]:
    """This process's descendants, with their start times (to tell a recycled pid apart)."""
    import os

    table, found, frontier = _proc_table(), [], [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in table.items():
            if ppid == parent:
                found.append((pid, start))
                frontier.append(pid)
    return found


def reap_when_dead(procs: list[tuple[int, str]]) -> None:
    """Start a watchdog that kills `procs` once this runner is gone (killed with SIGKILL, it cannot stop Ray).

    Without it Ray's raylet and workers do exit, but its DashboardAgent and RuntimeEnvAgent stay (about
    180 MB, measured with Ray 2.60), each runner killed leaving two more.
    """
    import os
    import subprocess
    import sys

    me = _proc_table().get(os.getpid())
    if not procs or me is None:
        return
    subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpid()), json.dumps(procs), me[1]],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
