"""CPU time per operation, from /proc: unlike latency and throughput, it hardly depends on what else the
machine runs, so it is the figure to compare between changes on a shared 2-core box."""

from __future__ import annotations

import os
import time
from pathlib import Path


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU time per process (Linux /proc); processes already gone are left out."""
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def pids_named(command: str) -> list[int]:
    """Processes whose command name is `command` (`postgres`: the server and every backend; `java`: the broker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == command:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class CpuMeter:
    """CPU spent per operation by the servers (the service processes under test), PostgreSQL (every
    backend alive at the end; one that started meanwhile counts from zero), the Kafka broker and this
    process."""

    def __init__(self, servers: list[int]) -> None:
        self.servers = servers

    def _snapshot(self) -> list[dict[int, float]]:
        return [cpu_seconds(self.servers), cpu_seconds(pids_named("postgres")), cpu_seconds(pids_named("java"))]

    def __enter__(self) -> CpuMeter:
        self.start, self.start_own = self._snapshot(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end, self.end_own = self._snapshot(), time.process_time()

    def report(self, operations: int, what: str, *, servers: str = "servers") -> None:
        def spent(a: dict[int, float], b: dict[int, float]) -> float:
            return sum(t - a.get(pid, 0.0) for pid, t in b.items())

        per = 1000 / operations
        server, pg, kafka = (spent(self.start[i], self.end[i]) * per for i in range(3))
        client = (self.end_own - self.start_own) * per
        print(
            f"  CPU per {what}: {servers} {server:.3f} ms, PostgreSQL {pg:.3f} ms, Kafka broker {kafka:.3f} ms, "
            f"bench process {client:.3f} ms"
        )
