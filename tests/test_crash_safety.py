"""Crash safety with real kills, and the CLI writing nothing outside its output.

`python -m ondevice.cli convert` / `export-android` run in subprocesses and are killed with SIGKILL at
seeded random points spread over the part of the run that writes (measured first: most of a run is
Python importing). After every kill the output must be absent or a complete bundle that loads with
its checksums verified, never a partial one; temporary directories left by the killed run must not
break the next conversion, which removes them. scripts/kill_convert.py runs the same loop longer.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from models import write_tiny_llama_gguf

import ondevice
from ondevice.bundle import MANIFEST, read_bundle

CLI = [sys.executable, "-m", "ondevice.cli"]
SEED = 20261207


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("crash-gguf") / "tiny.gguf", weight_type="Q4_1", seed=3)


def temp_siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def check_state(out: Path, previous: bool) -> str:
    """'absent' | 'complete'; fails on a partial bundle, and on a missing one where a previous bundle
    was (--force swaps the new bundle in with one atomic exchange of the two names)."""
    if not out.exists():
        assert not previous, f"{out}: the previous bundle is gone: {temp_siblings(out)}"
        return "absent"
    read_bundle(out, verify=True)  # a partial bundle fails here (BundleError)
    model = ondevice.load(out, threads=1)
    assert model.generate([1, 2, 3], max_tokens=2, temperature=0).token_ids
    return "complete"


class Killer:
    """Starts a command, waits until `started(pid)` says it has begun writing, sleeps a seeded random
    part of the writing time, then SIGKILLs it (if it has not finished)."""

    def __init__(self, rng: random.Random, write_s: float):
        self.rng, self.write_s = rng, write_s
        self.kills = self.finished = 0

    def run(self, argv: list[str], started) -> bool:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.perf_counter()
        early = self.rng.random() < 0.15  # some kills land before anything is written
        delay = self.rng.uniform(0, 1.0) if early else self.rng.uniform(0, self.write_s)
        if not early:
            while proc.poll() is None and not started(proc.pid) and time.perf_counter() - t0 < 60:
                time.sleep(0.001)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            self.kills += 1
            return True
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.returncode == 0, err
        self.finished += 1
        return False


def opened(pid: int, folder: Path) -> bool:
    """Whether process pid has a file of folder open (export-android reads the bundle first)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{folder}/"):
                return True
        except OSError:
            pass
    return False


def timed(argv: list[str], started) -> tuple[float, float]:
    """(seconds until started(), seconds from then to the end) of one complete run."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.perf_counter()
    t_start = None
    while proc.poll() is None:
        if t_start is None and started(proc.pid):
            t_start = time.perf_counter()
        time.sleep(0.001)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 0, err
    end = time.perf_counter()
    t_start = t_start or end
    return t_start - t0, end - t_start


def convert_lane(gguf: Path, parent: Path, seed: int, kills: int, force: bool) -> dict:
    parent.mkdir()
    out = parent / "tiny.bundle"
    started = lambda pid: any(p.name.startswith(".tiny.bundle.partial-") for p in parent.iterdir())  # noqa: E731
    argv = [*CLI, "convert", str(gguf), str(out), "--quiet", "--force"]
    _, write_s = timed(argv, started)  # leaves a complete bundle at out
    if not force:
        ondevice_rm(out)
    killer = Killer(random.Random(seed), max(write_s, 0.05))
    states: dict[str, int] = {}
    quants = ["q4", "q8"]
    while killer.kills < kills:
        if not force and out.exists():
            ondevice_rm(out)
        previous = out.exists()
        killer.run(argv + ["--quant", quants[killer.kills % 2]], started)
        state = check_state(out, previous)
        states[state] = states.get(state, 0) + 1
    left = temp_siblings(out)
    code = subprocess.run(argv, capture_output=True, text=True)  # the next conversion, over the leftovers
    assert code.returncode == 0, code.stderr
    read_bundle(out, verify=True)
    return {"kills": killer.kills, "finished": killer.finished, "states": states, "left_by_kills": left,
            "left_after_next": temp_siblings(out), "write_s": write_s}


def ondevice_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def export_lane(gguf: Path, parent: Path, seed: int, kills: int) -> dict:
    parent.mkdir()
    bundle = parent / "tiny.bundle"
    subprocess.run([*CLI, "convert", str(gguf), str(bundle), "--quiet"], check=True, capture_output=True)
    argv = [*CLI, "export-android", str(bundle)]
    started = lambda pid: opened(pid, bundle)  # noqa: E731
    timed(argv, started)  # a previous export is in the bundle from now on
    _, write_s = timed(argv, started)
    killer = Killer(random.Random(seed), max(write_s, 0.05))
    while killer.kills < kills:
        killer.run(argv, started)
        check_state(bundle, previous=True)
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    b = read_bundle(bundle, verify=True)
    assert "android" in b.manifest["backends"] and "android.onnx" in b.manifest["files"]
    return {"kills": killer.kills, "finished": killer.finished, "write_s": write_s,
            "stray": sorted(p.name for p in bundle.iterdir() if p.name.startswith(".manifest."))}


def test_kill_9_during_convert_and_export_android_never_leaves_a_partial_bundle(gguf, tmp_path):
    """~20 kills in three lanes run side by side: fresh output, --force over a complete bundle,
    export-android over a bundle exported before."""
    with ThreadPoolExecutor(3) as pool:
        fresh = pool.submit(convert_lane, gguf, tmp_path / "fresh", SEED, 7, False)
        forced = pool.submit(convert_lane, gguf, tmp_path / "forced", SEED + 1, 7, True)
        export = pool.submit(export_lane, gguf, tmp_path / "export", SEED + 2, 6)
        fresh, forced, export = fresh.result(), forced.result(), export.result()
    print(json.dumps({"fresh": fresh, "forced": forced, "export": export}))
    assert fresh["kills"] == 7 and forced["kills"] == 7 and export["kills"] == 6
    assert fresh["left_after_next"] == [] and forced["left_after_next"] == []  # stale temp dirs removed
    assert export["stray"] == []


def test_an_export_killed_after_its_files_before_its_manifest_leaves_matching_checksums(
        tiny_bundle, copy_bundle, monkeypatch):
    """The window the random kills rarely hit: android.onnx(.data) replaced, manifest.json not yet."""
    from ondevice.converters.export_android import export_android

    bundle = copy_bundle(tiny_bundle, "tiny.bundle")
    export_android(bundle)
    real_replace = os.replace
    replaced: list[str] = []

    def replace(src, dst):
        if Path(dst).name == MANIFEST and "android.onnx" in replaced:
            raise KeyboardInterrupt  # as a kill -9 here: nothing after this runs
        replaced.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        export_android(bundle)
    monkeypatch.undo()
    b = read_bundle(bundle, verify=True)  # the old entries were dropped before the files changed
    assert "android" not in b.manifest["backends"]
    ondevice.load(bundle, threads=1)
    export_android(bundle)
    assert "android" in read_bundle(bundle, verify=True).manifest["backends"]


def dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_a_conversion_removes_stale_temp_dirs_of_dead_processes_only(tiny_gguf, tmp_path):
    pid = dead_pid()
    for name in (f".tiny.bundle.partial-{pid}-abc", f".tiny.bundle.old-{pid}",
                 f".tiny.bundle.partial-{os.getpid()}-live", ".other.bundle.partial-1-x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_bytes(b"half")
    ondevice.convert(tiny_gguf, tmp_path / "tiny.bundle", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.bundle.partial-1-x", f".tiny.bundle.partial-{os.getpid()}-live", "tiny.bundle"]


def test_an_old_bundle_moved_aside_by_a_killed_force_conversion_is_moved_back(tiny_gguf, tmp_path):
    """Where names cannot be exchanged atomically, --force moves the old bundle to .NAME.old-PID
    before the new one goes in; a kill between the two renames leaves OUT absent until the next
    conversion to OUT, which puts the old bundle back first (so without --force it refuses)."""
    out = tmp_path / "tiny.bundle"
    ondevice.convert(tiny_gguf, out, progress=False)
    before = json.loads((out / MANIFEST).read_text())
    os.replace(out, tmp_path / f".tiny.bundle.old-{dead_pid()}")
    with pytest.raises(ondevice.BundleExistsError):
        ondevice.convert(tiny_gguf, out, progress=False)
    assert json.loads((out / MANIFEST).read_text()) == before
    assert temp_siblings(out) == []
    read_bundle(out, verify=True)


def test_force_swaps_the_new_bundle_in_without_a_moment_where_out_is_missing(tiny_gguf, tmp_path, monkeypatch):
    from ondevice import bundle as bundle_module

    out = tmp_path / "tiny.bundle"
    ondevice.convert(tiny_gguf, out, progress=False)
    before = (out / MANIFEST).read_text()
    seen = []
    real_exchange = bundle_module._exchange

    def exchange(a, b):
        done = real_exchange(a, b)
        seen.append((done, out.is_dir() and (out / MANIFEST).is_file()))
        return done

    monkeypatch.setattr(bundle_module, "_exchange", exchange)
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append(("replace", Path(b).name)), real_replace(a, b))[1])
    ondevice.convert(tiny_gguf, out, force=True, quant="q8", progress=False)
    assert seen == [(True, True)]  # one exchange, no rename that leaves OUT absent
    assert (out / MANIFEST).read_text() != before  # the q8 bundle is in place
    read_bundle(out, verify=True)
    assert temp_siblings(out) == []


# --- the CLI writes only its output ---------------------------------------------------------------

def snapshot(*roots: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    files = {}
    for root in roots:
        for p in root.rglob("*"):
            if skip is not None and (p == skip or skip in p.parents):
                continue
            st = p.lstat()
            files[str(p)] = (st.st_size, st.st_mtime_ns)
    return files


def test_convert_and_export_android_write_nothing_outside_the_output(gguf, tmp_path):
    home, cwd, tmp, out_parent = (tmp_path / d for d in ("home", "cwd", "tmp", "out"))
    for d in (home, cwd, tmp, out_parent):
        d.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    source = src / "tiny.gguf"
    source.write_bytes(gguf.read_bytes())
    out = out_parent / "tiny.bundle"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env.update(HOME=str(home), TMPDIR=str(tmp), PYTHONDONTWRITEBYTECODE="1")
    roots = (home, cwd, tmp, src, out_parent)
    before = snapshot(*roots)
    for argv in (["convert", str(source), str(out), "--quiet"], ["export-android", str(out)],
                 ["convert", str(source), str(out), "--quiet", "--force", "--quant", "q8"]):
        before_step = snapshot(*roots, skip=out)
        r = subprocess.run([*CLI, *argv], cwd=cwd, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert snapshot(*roots, skip=out) == before_step, argv
    assert snapshot(*roots, skip=out) == before
    read_bundle(out, verify=True)
