"""Device profiles: every shipped profile validates (also against profiles/schema.json), bad ones are
refused with a ProfileError that names the field, and the planner keeps the profile's preference
order, falls back to what this onnxruntime has with one log line per provider left out, and always
ends with the CPU provider.
"""

import copy
import json
import logging
import os
from importlib.resources import files

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ondevice.errors import OndeviceError, ProfileError
from ondevice.profiles import Plan, detect_host, list_profiles, load_profile, plan, validate_profile

SHIPPED = ["apple-a17pro-iphone", "apple-m2-macbook-air", "generic-arm64-cpu", "laptop-x86-2core",
           "snapdragon-8gen3-phone", "tensor-g3-phone"]
QNN, XNNPACK, CPU = "QNNExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider"


def phone() -> dict:
    return copy.deepcopy(load_profile("snapdragon-8gen3-phone"))


def test_shipped_profiles_are_listed_by_name():
    assert list_profiles() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_validates(name):
    profile = load_profile(name)
    assert profile["name"] == name
    assert validate_profile(profile) is profile


@pytest.mark.parametrize("name", SHIPPED)
def test_every_figure_of_a_shipped_profile_has_a_source(name):
    profile = load_profile(name)
    for key, entry in profile["sources"].items():
        assert entry["ref"].strip(), key
    figures = [profile["dram_mb"], profile["memory_bandwidth_gb_s"], profile["storage"]["seq_read_mb_s"]]
    assert all(f is not None for f in figures)  # shipped profiles know their main figures


def test_shipped_profiles_match_the_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((files("ondevice.profiles_data") / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for name in SHIPPED:
        validator.validate(load_profile(name))
    validator.validate(detect_host())


def break_profile(change):
    profile = phone()
    change(profile)
    return profile


BROKEN = {
    "missing field": (lambda p: p.pop("dram_mb"), "missing field 'dram_mb'"),
    "missing nested field": (lambda p: p["storage"].pop("seq_read_mb_s"), "missing field 'storage.seq_read_mb_s'"),
    "wrong type": (lambda p: p.update(dram_mb="12 GB"), "dram_mb must be an integer, got '12 GB'"),
    "negative bandwidth": (lambda p: p.update(memory_bandwidth_gb_s=-5), "memory_bandwidth_gb_s must be > 0, got -5"),
    "zero storage speed": (lambda p: p["storage"].update(rand_4k_read_mb_s=0), "storage.rand_4k_read_mb_s must be > 0"),
    "misspelled provider": (lambda p: p["execution_providers"][0].update(name="QnnExecutionProvider"),
                            "'QnnExecutionProvider' is not an ONNX Runtime execution provider; "
                            "did you mean 'QNNExecutionProvider'?"),
    "unknown field": (lambda p: p.update(dram_gb=12), "unknown field 'dram_gb'; did you mean 'dram_mb'?"),
    "cores do not add up": (lambda p: p["cpu"]["cores"].update(big=7), "big (7) + little (2) must equal total (8)"),
    "chunk not an NPU size": (lambda p: p.update(prefill_chunk=100), "prefill_chunk 100 is not one of npu.chunk_sizes"),
    "CPU not last": (lambda p: p["execution_providers"].reverse(), "list it last"),
    "provider twice": (lambda p: p["execution_providers"].insert(0, {"name": CPU}), "lists a provider twice"),
    "non-string option": (lambda p: p["execution_providers"][0]["options"].update(htp_graph_finalization_optimization_mode=3),
                          "options.htp_graph_finalization_optimization_mode must be a string"),
    "figure without source": (lambda p: p["sources"].pop("dram_mb"), "sources has no entry for 'dram_mb'"),
    "source for no field": (lambda p: p["sources"].update({"dram_gb": {"kind": "vendor", "ref": "x"}}),
                            "sources.dram_gb names no field of the profile"),
    "unknown source kind": (lambda p: p["sources"]["dram_mb"].update(kind="guess"), "'guess' is not one of vendor"),
    "unknown precision": (lambda p: p["npu"]["precisions"].append("int2"), "npu.precisions[3] 'int2' is not one of"),
    "unsorted chunk sizes": (lambda p: p["npu"]["chunk_sizes"].reverse(), "must be increasing without repeats"),
    "NPU provider not listed": (lambda p: p["execution_providers"].pop(0),
                                "npu.execution_providers names QNNExecutionProvider, which execution_providers does not list"),
    "newer schema": (lambda p: p.update(schema_version=2), "schema_version is 2; this version of ondevice reads 1"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_invalid_profiles_raise_profile_error_naming_the_field(case):
    change, message = BROKEN[case]
    with pytest.raises(ProfileError, match="^snapdragon.json: ") as err:
        validate_profile(break_profile(change), "snapdragon.json")
    assert message in str(err.value)
    assert isinstance(err.value, OndeviceError)


@pytest.mark.parametrize("case", ["missing field", "wrong type", "negative bandwidth", "unknown field",
                                  "non-string option", "unknown source kind"])
def test_the_json_schema_rejects_them_too(case):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((files("ondevice.profiles_data") / "schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(break_profile(BROKEN[case][0]), schema)


def test_load_by_path(tmp_path):
    path = tmp_path / "my-phone.json"
    path.write_text(json.dumps(phone() | {"name": "my-phone"}))
    assert load_profile(path)["name"] == "my-phone"
    assert load_profile(str(path))["name"] == "my-phone"


def test_load_errors_say_what_to_do(tmp_path):
    with pytest.raises(ProfileError, match="unknown profile 'snapdragon-8gen3'.*did you mean 'snapdragon-8gen3-phone'"):
        load_profile("snapdragon-8gen3")
    with pytest.raises(ProfileError, match="profile file not found"):
        load_profile(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="bad.json: not valid JSON"):
        load_profile(bad)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(break_profile(lambda p: p.pop("cpu"))))
    with pytest.raises(ProfileError, match="broken.json: missing field 'cpu'"):
        load_profile(broken)


def test_plan_keeps_preference_order_and_options():
    result = plan(phone(), available_providers=[CPU, XNNPACK, QNN, "AzureExecutionProvider"])
    assert result.providers == [(QNN, {"backend_path": "libQnnHtp.so", "htp_performance_mode": "burst"}),
                                (XNNPACK, {}), (CPU, {})]
    assert result.fallbacks == []
    assert (result.prefill_chunk, result.threads) == (256, 6)


def test_plan_falls_back_with_one_log_line_per_missing_provider(caplog):
    with caplog.at_level(logging.WARNING, logger="ondevice.profiles"):
        result = plan(phone(), available_providers=[CPU, XNNPACK])
    assert result.providers == [(XNNPACK, {}), (CPU, {})]
    assert result.fallbacks == ["QNNExecutionProvider not available in this onnxruntime build: "
                                "falling back to XnnpackExecutionProvider"]
    assert [r.getMessage() for r in caplog.records] == result.fallbacks

    result = plan(phone(), available_providers=[CPU])
    assert result.providers == [(CPU, {})]
    assert result.fallbacks == [f"{QNN} not available in this onnxruntime build: falling back to {CPU}",
                                f"{XNNPACK} not available in this onnxruntime build: falling back to {CPU}"]
    assert result.prefill_chunk == 256  # the same static chunk graph runs on the CPU provider


def test_plan_always_ends_with_the_cpu_provider():
    profile = copy.deepcopy(load_profile("generic-arm64-cpu"))
    profile["execution_providers"] = [{"name": XNNPACK}]
    assert plan(profile, available_providers=[XNNPACK, CPU]).providers == [(XNNPACK, {}), (CPU, {})]
    assert plan(profile, available_providers=[]).providers == [(CPU, {})]


def test_plan_fits_the_chunk_to_the_bundle_context():
    assert plan(phone(), {"max_context": 2048}, [CPU]).prefill_chunk == 256
    shorter = plan(phone(), {"max_context": 200}, [CPU])
    assert shorter.prefill_chunk == 128
    assert "prefill chunk 256 does not fit the bundle's context of 200 tokens: using chunks of 128" in shorter.fallbacks
    tiny = plan(phone(), {"max_context": 32}, [CPU])
    assert tiny.prefill_chunk is None
    assert tiny.fallbacks[-1].endswith("one-shot prefill")


def test_plan_of_a_cpu_only_profile_is_one_shot_on_the_big_cores():
    result = plan(load_profile("generic-arm64-cpu"), available_providers=[CPU])
    assert result == Plan(providers=[(CPU, {})], fallbacks=[f"{XNNPACK} not available in this onnxruntime "
                                                            f"build: falling back to {CPU}"],
                          prefill_chunk=None, threads=4)


def test_plan_refuses_an_invalid_profile():
    with pytest.raises(ProfileError, match="missing field 'sources'"):
        plan(break_profile(lambda p: p.pop("sources")), available_providers=[CPU])


def test_detect_host_returns_a_valid_profile():
    host = detect_host()
    assert validate_profile(host) is host
    cores = host["cpu"]["cores"]
    assert cores["total"] == len(os.sched_getaffinity(0)) and cores["big"] >= 1
    assert host["dram_mb"] > 0 and host["npu"] is None
    result = plan(host)
    assert result.providers == [(CPU, {})] and result.prefill_chunk is None and result.fallbacks == []


def test_onnxruntime_accepts_the_planned_providers():
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = plan(phone())  # the real onnxruntime: QNN and XNNPACK are not in the CPU wheel
    session = ort.InferenceSession(model.SerializeToString(), providers=result.providers)
    assert session.get_providers()[-1] == CPU
    assert session.run(None, {"x": np.ones(2, np.float32)})[0].tolist() == [1.0, 1.0]
    onnx.checker.check_model(model)
