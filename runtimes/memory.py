"""Give back memory that a freshly loaded session holds but will not use again (Linux).

ONNX Runtime maps every external initializer of a bundle and, while prepacking the quantized
weights into its own layout, reads all of them. The packed copies are what runs from then on;
the source pages stay resident although most are never read again (the tied embedding table is
read a few rows per token). `release_file_pages` drops this process's pages of the bundle's files;
any page still needed faults back in (from the page cache, which keeps them). `trim_heap` returns the load's freed heap (graph protos, JSON trees) to the system.
Elsewhere both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MADV_DONTNEED = 4  # unmap the pages from this process; a file's clean pages stay in the page cache
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


def _mappings(folder: str | os.PathLike) -> list[tuple[int, int, int, bool]]:
    """(start, end, resident bytes, holds private changes) of this process's mappings of files in folder."""
    prefix = os.path.realpath(folder) + os.sep
    out: list[list] = []
    inside = False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                fields = line.split()
                if "-" in fields[0] and not fields[0].endswith(":"):
                    inside = len(fields) == 6 and fields[5].startswith(prefix)
                    if inside:
                        start, end = (int(x, 16) for x in fields[0].split("-"))
                        out.append([start, end, 0, False])
                elif inside and fields[0] == "Rss:":
                    out[-1][2] = int(fields[1]) * 1024
                elif inside and fields[0] in ("Private_Dirty:", "Anonymous:") and int(fields[1]) > 0:
                    out[-1][3] = True
    except OSError:
        return []
    return [tuple(m) for m in out]


def resident_bytes(folder: str | os.PathLike) -> int:
    """How much of folder's mapped files is resident in this process (Rss of their mappings)."""
    return sum(rss for _, _, rss, _ in _mappings(folder))


def release_file_pages(folder: str | os.PathLike) -> int:
    """Drop this process's resident pages of files inside folder; returns the bytes advised.
    A mapping holding no private changes is dropped from the process only (MADV_DONTNEED: the
    page cache keeps the pages, so the next load reads them from memory, and a page needed again
    faults back in at once); one with private changes, which DONTNEED would discard, is only
    asked to be reclaimed (MADV_PAGEOUT)."""
    libc = _libc()
    if libc is None:
        return 0
    advised = 0
    for start, end, rss, changed in _mappings(folder):
        if rss and libc.madvise(start, end - start, MADV_PAGEOUT if changed else MADV_DONTNEED) == 0:
            advised += end - start
    return advised


def trim_heap() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)

