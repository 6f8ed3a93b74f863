"""`python -m fedmoe.support.watchdog SUPERVISOR CHILD`: when SUPERVISOR dies, stop CHILD and
everything CHILD started.

PR_SET_PDEATHSIG takes the child down with its supervisor, but not the child's own children, and
Flower's start theirs in process groups of their own (SuperExec, then the ServerApp, the simulation
and Ray's raylet and agents). So this process, in a session of its own, keeps a list of the child's
descendants (their process ids and groups, from /proc, every second) and stops them all, SIGTERM
then SIGKILL, once the supervisor is gone. It exits on its own when the child's tree is empty.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

SCAN_EVERY_S = 1.0
GRACE_S = 5.0


def _parents() -> dict[int, int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    return parents


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def _signal_all(pids: set[int], groups: set[int], sig: int) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def watch(supervisor: int, child: int) -> None:
    tree: set[int] = {child}
    groups: set[int] = set()
    while True:
        living = {pid for pid in tree | descendants(child) if _alive(pid)}
        if not living:
            return
        tree = living
        for pid in tree:
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass
        groups.discard(os.getpgrp())
        if not _alive(supervisor):
            _signal_all(tree, groups, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline and any(_alive(p) for p in tree):
                time.sleep(0.2)
            _signal_all(tree, groups, signal.SIGKILL)
            return
        time.sleep(SCAN_EVERY_S)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
