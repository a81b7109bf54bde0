"""Reading a `histosam serve` process's start-up lines (shared by the CLI server tests)."""

from __future__ import annotations

import subprocess
import time


def startup_text(proc: subprocess.Popen, seconds: float) -> str:
    """Its stdout up to the last start-up line ("edge snapping ..."), the end of output, or ``seconds``."""
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "edge snapping" in line:  # the last start-up line
            break
    return "".join(lines)
