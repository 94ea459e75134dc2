"""Give back memory that a freshly loaded session holds but will not use again (Linux).

ONNX Runtime maps every external initializer of a bundle and, while prepacking the quantized
weights into its own layout, reads all of them. The packed copies are what runs from then on;
the source pages stay resident although most are never read again (the tied embedding table is
read a few rows per token). `release_file_pages` asks the kernel to reclaim this process's pages
of the bundle's files: clean file pages are dropped, and any page still needed faults back in
from storage. `trim_heap` returns the load's freed heap (graph protos, JSON trees) to the system.
Elsewhere both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim now; a no-op for pages other processes also map


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def file_mappings(folder: str | os.PathLike) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of files inside folder."""
    prefix = os.path.realpath(folder) + os.sep
    spans = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n").startswith(prefix):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    spans.append((start, end))
    except OSError:
        return []
    return spans


def resident_bytes(folder: str | os.PathLike) -> int:
    """How much of folder's mapped files is resident in this process (Rss of their mappings)."""
    prefix = os.path.realpath(folder) + os.sep
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                    inside = len(fields) == 6 and fields[5].startswith(prefix)
                elif inside and fields[0] == "Rss:":
                    total += int(fields[1]) * 1024
    except OSError:
        return 0
    return total


def release_file_pages(folder: str | os.PathLike) -> int:
    """Reclaim this process's resident pages of files inside folder; returns the bytes advised."""
    libc = _libc()
    if libc is None:
        return 0
    advised = 0
    for start, end in file_mappings(folder):
        if libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += end - start
    return advised


def trim_heap() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)

