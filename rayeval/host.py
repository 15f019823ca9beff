"""What this host is, as far as rayeval's caches and defaults depend on it: the CPU's flags,
an executable's identity (path, size, modification time), its C compiler, and rayeval's C
kernels built with it (``kernel_host_ok``, ``build_kernel``, ``load_kernel``)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
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


def c_compiler() -> str | None:
    """The C compiler rayeval's kernels build with: ``$CC``, else ``cc``, ``gcc``, ``clang``."""
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def kernel_host_ok(needs: set[str], switch: str) -> bool:
    """Whether this host can build one of rayeval's C kernels (nothing is compiled): Linux on
    x86-64 with the CPU flags ``needs`` and a C compiler, and ``$switch`` not ``0``."""
    return (os.environ.get(switch, "1") != "0" and sys.platform.startswith("linux")
            and platform.machine() == "x86_64" and needs <= cpu_flags() and c_compiler() is not None)


def load_kernel(source: Path, flags: list[str]) -> ctypes.CDLL:
    """``source`` built (:func:`build_kernel`, host's C compiler) and loaded with ctypes, after
    torch: its OpenMP runtime first, so the kernel's threads are torch's.  Raises ``OSError`` or
    ``subprocess.CalledProcessError`` where it cannot be."""
    import torch  # noqa: F401

    return ctypes.CDLL(str(build_kernel(source, flags, c_compiler() or "cc")))


def build_kernel(source: Path, flags: list[str], cc: str) -> Path:
    """``source`` compiled with ``cc`` and ``flags`` into a shared library in rayeval's cache folder
    (``kernels/<stem>-<key>.so``, keyed by the source, the headers beside it, the compiler and the
    flags): built once per host, then reused.  Raises ``subprocess.CalledProcessError`` if the
    compiler fails."""
    from rayeval.config import cache_dir

    texts = [source.read_text()] + [h.read_text() for h in sorted(source.parent.glob("*.h"))]
    key = hashlib.sha256("\0".join([*texts, executable_identity(cc), *flags]).encode()).hexdigest()[:20]
    out = cache_dir() / "kernels" / f"{source.stem}-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.so")
        subprocess.run([cc, *flags, str(source), "-o", str(tmp)], check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    return out
