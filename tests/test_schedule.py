"""The prefill DAG, its in-order and out-of-order schedules, and the device cost model."""

import random

import pytest

from ondevice.profiles import load_profile
from ondevice.schedule import (CPU, NPU, DeviceModel, ModelShape, Task, flop_latencies, prefill_dag, simulate,
                               upward_ranks)

SMOLLM2 = ModelShape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152)


def random_latencies(seed: int):
    rng = random.Random(seed)
    table: dict[Task, float] = {}
    return lambda t: table.setdefault(t, rng.uniform(0.1, 3.0) * (4 if t.kind == "attn" and seed % 2 else 1))


def test_the_dag_has_the_data_and_cache_dependencies():
    dag = prefill_dag(chunks=3, layers=2)
    assert dag[Task("pre", 1, 0)] == (Task("embed", 1),)
    assert dag[Task("pre", 1, 1)] == (Task("post", 1, 0),)
    assert set(dag[Task("attn", 2, 1)]) == {Task("pre", 2, 1), Task("attn", 1, 1)}  # the KV chunk 1 wrote
    assert dag[Task("attn", 0, 1)] == (Task("pre", 0, 1),)
    assert dag[Task("post", 2, 0)] == (Task("attn", 2, 0),)
    assert dag[Task("head", 2)] == (Task("post", 2, 1),)
    assert len(dag) == 3 * (1 + 3 * 2) + 1
    assert {t.processor for t in dag if t.kind == "attn"} == {CPU}
    assert {t.processor for t in dag if t.kind != "attn"} == {NPU}


@pytest.mark.parametrize("policy", ["in-order", "out-of-order"])
@pytest.mark.parametrize("seed", range(6))
def test_every_schedule_respects_the_dependencies_and_runs_one_task_at_a_time_per_processor(policy, seed):
    dag = prefill_dag(chunks=4, layers=3)
    lat = random_latencies(seed)
    s = simulate(dag, lat, policy)
    slot = {x.task: x for x in s.slots}
    assert set(slot) == set(dag)
    for task, deps in dag.items():
        assert slot[task].end - slot[task].start == pytest.approx(lat(task))
        assert all(slot[d].end <= slot[task].start + 1e-12 for d in deps)
    for p in (NPU, CPU):
        mine = sorted((x for x in s.slots if x.task.processor == p), key=lambda x: x.start)
        assert all(a.end <= b.start + 1e-12 for a, b in zip(mine, mine[1:]))
        assert s.busy[p] == pytest.approx(sum(lat(x.task) for x in mine))
    assert s.makespan == pytest.approx(max(x.end for x in s.slots))


def test_in_order_runs_one_task_at_a_time():
    dag = prefill_dag(chunks=3, layers=4)
    lat = random_latencies(1)
    assert simulate(dag, lat, "in-order").makespan == pytest.approx(sum(lat(t) for t in dag))


@pytest.mark.parametrize("seed", range(20))
def test_out_of_order_is_never_slower_than_in_order(seed):
    rng = random.Random(seed)
    dag = prefill_dag(chunks=rng.randint(1, 6), layers=rng.randint(1, 5))
    lat = random_latencies(seed)
    ooo, ino = simulate(dag, lat, "out-of-order"), simulate(dag, lat, "in-order")
    assert ooo.makespan <= ino.makespan + 1e-9
    # and never below what the busier processor or the critical path needs
    assert ooo.makespan >= max(ooo.busy.values()) - 1e-9
    assert ooo.makespan >= max(upward_ranks(dag, lat).values()) - 1e-9


def test_out_of_order_keeps_the_npu_busy_while_the_cpu_attends():
    dag = prefill_dag(chunks=4, layers=30)
    lat = flop_latencies(SMOLLM2, 256)
    ooo, ino = simulate(dag, lat, "out-of-order"), simulate(dag, lat, "in-order")
    assert ooo.idle[NPU] < 0.2 * ino.idle[NPU]
    assert ooo.makespan < ino.makespan


def test_an_order_found_with_some_latencies_replays_with_others():
    dag = prefill_dag(chunks=4, layers=3)
    found = simulate(dag, random_latencies(2), "out-of-order")
    replay = simulate(dag, random_latencies(3), orders={p: found.order(p) for p in (NPU, CPU)})
    assert [x.task for x in replay.slots if x.task.processor == NPU] == found.order(NPU)
    with pytest.raises(ValueError, match="every task"):
        simulate(dag, random_latencies(3), orders={NPU: found.order(NPU), CPU: []})


def test_the_device_model_cites_the_profile_and_states_its_assumptions():
    profile = load_profile("snapdragon-8gen3-phone")
    model = DeviceModel.from_profile(profile)
    assert "73" in model.assumptions["npu.int8_tops"] and "arXiv:2407.05858" in model.assumptions["npu.int8_tops"]
    for key in ("npu_utilisation", "cpu_utilisation", "memory_bandwidth", "npu_call", "attention_cores"):
        assert model.assumptions[key]
    lat = model.latencies(SMOLLM2, 256)
    # attention grows with the cache; linear work does not
    assert lat(Task("attn", 3, 0)) > lat(Task("attn", 0, 0))
    assert lat(Task("post", 3, 0)) == lat(Task("post", 0, 0))
    slower = DeviceModel.from_profile(profile, npu_utilisation=0.01).latencies(SMOLLM2, 256)
    assert slower(Task("post", 0, 0)) > lat(Task("post", 0, 0))
    with pytest.raises(ValueError, match="NPU"):
        DeviceModel.from_profile(load_profile("laptop-x86-2core"))


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="policy"):
        simulate(prefill_dag(1, 1), lambda t: 1.0, "random")
