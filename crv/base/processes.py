"""Processes: their start time from /proc (a pid with another start time is another process).

Linux /proc; elsewhere the start time is unknown (None)."""

from __future__ import annotations

from pathlib import Path


def start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]
