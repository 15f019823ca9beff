"""What this host is, as far as rayeval's caches and defaults depend on it: the CPU's flags and
an executable's identity (path, size, modification time)."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def executable_identity(cmd: str) -> str:
    """``path:size:mtime`` of the executable ``cmd`` resolves to (``cmd`` itself where it does not):
    a cache keyed by it follows a reinstalled compiler."""
    path = shutil.which(cmd) or cmd
    try:
        st = os.stat(path)
    except OSError:
        return path
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"
