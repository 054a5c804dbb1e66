"""CPU pinning for the single-worker phases: the server under test on one core, everything else on the other.

On 2 cores the load generator, the fake n8n and PostgreSQL otherwise compete with the server for its core, so
its figures would include their work. `Pinning` pins, remembers every affinity it changed and puts them back
(`restore()`, called from the benchmark's `finally`, so also on errors and SIGTERM). PostgreSQL backends fork
from the postmaster and inherit its affinity, so `restore()` also resets the backends that were forked while
it was pinned. All through `os.sched_setaffinity`, per thread (`/proc/<pid>/task`), since a thread's mask is
its own and only new threads inherit it.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CpuSet = frozenset[int]


def threads(pid: int) -> list[int]:
    """The thread ids of `pid` (itself alone when /proc lists none, e.g. it just exited)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def get_affinity(pid: int) -> CpuSet | None:
    """The CPUs `pid` may run on, or None when it is gone."""
    try:
        return frozenset(os.sched_getaffinity(pid))
    except (ProcessLookupError, PermissionError, OSError):
        return None


def set_affinity(pid: int, cpus: CpuSet) -> bool:
    """Set the mask of every thread of `pid`; False when the process is gone or may not be changed."""
    changed = False
    for tid in threads(pid):
        try:
            os.sched_setaffinity(tid, cpus)
            changed = True
        except (ProcessLookupError, PermissionError, OSError):
            continue
    return changed


def postgres_pids() -> list[int]:
    """Every running process whose `/proc/<pid>/comm` is `postgres` (the postmaster and its children)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if comm == "postgres":
            found.append(int(entry))
    return found


def plan(allowed: CpuSet) -> tuple[CpuSet, CpuSet] | None:
    """(server CPUs, everything else's CPUs) from the CPUs this process may use; None with fewer than 2."""
    cpus = sorted(allowed)
    if len(cpus) < 2:
        return None
    return frozenset({cpus[0]}), frozenset({cpus[1]})


@dataclass
class Pinning:
    """Pins and remembers: `original` maps every pid it changed to the mask it had before."""

    server: CpuSet
    others: CpuSet
    #: The mask children of the benchmark get back (they inherited a pinned one): this process's own.
    base: CpuSet = field(default_factory=lambda: frozenset(os.sched_getaffinity(0)))
    original: dict[int, CpuSet] = field(default_factory=dict)
    postgres: int = 0
    pg_default: CpuSet | None = None
    active: bool = False

    def _pin(self, pid: int, cpus: CpuSet, original: CpuSet | None = None) -> bool:
        before = get_affinity(pid)
        if before is None:
            return False
        self.original.setdefault(pid, original or before)
        self.active = True
        return set_affinity(pid, cpus)

    def pin_self_and_postgres(self) -> None:
        """The load generator (this process, every thread) and every running PostgreSQL process on `others`."""
        self._pin(os.getpid(), self.others)
        pids = postgres_pids()
        masks = [m for m in (get_affinity(pid) for pid in pids) if m is not None]
        if masks and self.pg_default is None:
            self.pg_default = Counter(masks).most_common(1)[0][0]
        self.postgres = sum(self._pin(pid, self.others) for pid in pids)

    def pin_server(self, pid: int) -> None:
        """A server under test, with its descendants (uvicorn workers), on `server`."""
        from bench.procs import tree

        for p in tree(pid):
            self._pin(p, self.server, self.base)

    def pin_other(self, pid: int) -> None:
        """A helper process (the fake n8n) with its descendants on `others`."""
        from bench.procs import tree

        for p in tree(pid):
            self._pin(p, self.others, self.base)

    def restore(self) -> None:
        """Put back every mask that was changed; PostgreSQL backends forked meanwhile get the postmaster's."""
        pg_default = self.pg_default
        for pid, cpus in self.original.items():
            set_affinity(pid, cpus)
        if pg_default is not None:
            for pid in postgres_pids():
                if pid not in self.original and get_affinity(pid) == self.others:
                    set_affinity(pid, pg_default)
        self.original.clear()
        self.active = False
