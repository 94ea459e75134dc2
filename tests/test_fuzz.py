"""The fuzz suite, bounded for CI: seeded mutations of every input boundary (GGUF headers and tensor
tables, bundle files and manifests, tokenizer.json, chat templates), each case in a worker process
under a memory limit and a timeout (tests/fuzz_harness.py). The only allowed outcomes are success
and an OndeviceError with a message.

ONDEVICE_FUZZ_EXAMPLES (cases per target) and ONDEVICE_FUZZ_SEED change the run; scripts/fuzz.py
runs the same cases for longer.
"""

from __future__ import annotations

import os

import pytest

import fuzz_harness as fh

EXAMPLES = int(os.environ.get("ONDEVICE_FUZZ_EXAMPLES", "120"))
SEED = int(os.environ.get("ONDEVICE_FUZZ_SEED", "20261207"))


@pytest.fixture(scope="module")
def worker():
    with fh.Worker() as w:
        yield w


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    return work, fh.setup(work)


@pytest.mark.parametrize("kind, outcome", [
    ("fine", "ok"), ("typed", "error:BundleError"), ("silent", "bad:BundleError(no message)"),
    ("untyped", "bad:KeyError"), ("hang", "hang"), ("crash", "crash"), ("blow-up", "bad:BundleError(from MemoryError)"),
])
def test_the_harness_tells_each_outcome_apart(worker, kind, outcome):
    assert worker.run("selftest", kind, timeout=10)[0] == outcome
    assert worker.run("selftest", "fine", timeout=10)[0] == "ok"  # a new worker after a crash or a hang


@pytest.mark.parametrize("target", list(fh.CASES))
def test_hostile_inputs_end_in_success_or_a_typed_error_with_a_message(worker, inputs, target):
    work, ctx = inputs
    tally = fh.Tally()
    for n in range(EXAMPLES):
        for name, outcome, detail, what in fh.CASES[target](ctx, fh.case_rng(SEED, target, n), work, worker, n):
            tally.add(name, outcome, f"case {n}: {detail}", what)
    print(target, tally.counts)
    assert sum(sum(per.values()) for per in tally.counts.values()) >= EXAMPLES
    assert not tally.failures, "\n".join(f"{name} {outcome}: {what}\n  {detail[-500:]}"
                                         for name, outcome, what, detail in tally.failures[:5])
