"""A loaded model holds only the weight pages it still reads; the rest of its bundle stays in storage."""

import mmap
import os
import sys

import pytest

import ondevice
from ondevice.runtimes.memory import release_file_pages, resident_bytes

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise/proc are Linux features")


@linux_only
def test_released_pages_leave_the_process_and_read_back_unchanged(tmp_path):
    data = os.urandom(8 << 20)
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # clean pages: reclaimable without writeback
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    assert view[::4096] == data[::4096]  # touches every page
    assert resident_bytes(tmp_path) >= 7 << 20

    assert release_file_pages(tmp_path) >= 8 << 20
    assert resident_bytes(tmp_path) < 1 << 20
    assert view[:] == data
    view.close()


@linux_only
def test_other_files_are_left_alone(tmp_path):
    (tmp_path / "mine").mkdir()
    path = tmp_path / "theirs.bin"
    path.write_bytes(os.urandom(1 << 20))
    with open(path, "rb") as f:
        view = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view[::4096]
    assert release_file_pages(tmp_path / "mine") == 0
    assert resident_bytes(tmp_path) >= 1 << 20
    view.close()


@linux_only
def test_a_loaded_smollm2_keeps_little_of_its_bundle_resident(smollm2_bundle):
    # ORT's prepacking read all 119 MB of weights; once loaded, none of it stays in the process, and
    # decoding brings back only what it reads from the file (scales, a few embedding rows), not the
    # 27 MB embedding table (50 MB stay resident without the release).
    model = ondevice.load(smollm2_bundle, threads=2)
    assert resident_bytes(smollm2_bundle) < 4 << 20
    model.generate("Name a colour.", max_tokens=4, temperature=0)
    assert resident_bytes(smollm2_bundle) < 40 << 20
