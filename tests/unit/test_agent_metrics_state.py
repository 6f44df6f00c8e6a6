"""Engine metrics re-export, the load signal, and the versioned /state schema round trip."""

import json

import pytest

from mvllm.agent.engine_metrics import add_label, load_signal, merge
from mvllm.agent.errors import BadRequest
from mvllm.agent.proxy import body_model
from mvllm.common.prom import iter_samples
from mvllm.common.state import (
    STATE_VERSION,
    AgentState,
    CatalogEntry,
    GpuProcess,
    GpuState,
    InstanceState,
    StaleEngine,
    StateVersionError,
)

ENGINE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="%s"} %d
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="%s"} %d
# HELP vllm:num_preemptions Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{engine="0",model_name="%s"} 0.0
vllm:num_preemptions_created{engine="0",model_name="%s"} 1.7e9
"""


def engine(name, running, waiting):
    return ENGINE % (name, running, name, waiting, name, name)


def test_load_signal_sums_label_sets():
    text = engine("a", 3, 1) + 'vllm:num_requests_running{engine="0",model_name="lora"} 2\n'
    assert load_signal(text) == (5, 1)


def test_add_label():
    assert add_label('m{a="1"} 2', 'instance="x"') == 'm{instance="x",a="1"} 2'
    assert add_label("m 2", 'instance="x"') == 'm{instance="x"} 2'
    assert add_label("m{} 2", 'instance="x"') == 'm{instance="x"} 2'


def test_merge_keeps_one_family_header_and_labels_every_sample():
    out = merge({"a": engine("a", 3, 1), "b": engine("b", 5, 0)})
    assert out.count("# TYPE vllm:num_requests_running gauge") == 1
    assert out.count("# HELP vllm:num_preemptions ") == 1
    # Samples of a family stay together, right after its TYPE line.
    lines = out.splitlines()
    i = lines.index("# TYPE vllm:num_requests_running gauge")
    assert all(line.startswith("vllm:num_requests_running{") for line in lines[i + 1 : i + 3])
    running = {s.labels["instance"]: s.value for s in iter_samples(out, ["vllm:num_requests_running"])}
    assert running == {"a": 3.0, "b": 5.0}
    # prometheus_client's own parser accepts it.
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name for f in text_string_to_metric_families(out)}
    assert {"vllm:num_requests_running", "vllm:num_preemptions"} <= fams


def test_body_model():
    assert body_model(b'{"model": "m", "messages": []}', "application/json") == "m"
    assert body_model(b"", "application/json") is None
    assert body_model(b'{"prompt": "x"}', "application/json") is None
    form = (
        b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n'
        b'--XX\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n--XX--\r\n'
    )
    assert body_model(form, "multipart/form-data; boundary=XX") == "whisper"
    with pytest.raises(BadRequest):
        body_model(b"{nope", "application/json")
    with pytest.raises(BadRequest):
        body_model(b"[1]", "application/json")


def sample_state() -> AgentState:
    return AgentState(
        host="gpu-1",
        engine="sim",
        agent="0.1.0",
        time=2.0,
        started_at=1.0,
        gpus=[
            GpuState(0, "H100", 80, 30, uuid="GPU-1", utilization_pct=50.0, processes=[GpuProcess(7, 30, "a")])
        ],
        instances=[
            InstanceState("a", "ready", ["a"], port=9001, pid=7, devices=[0], in_flight=2, memory_bytes=30),
            InstanceState("b", "sleeping", ["b"], sleep_level=2),
            InstanceState("c", "failed", ["c"], error="boom", log_tail=["x"]),
        ],
        catalog=[CatalogEntry("a", "org/a", ["a"], ["sql"], placement="awake")],
        stale_engines=[StaleEngine(99, "VLLM::EngineCore")],
    )


def test_state_round_trip_through_json():
    st = sample_state()
    data = json.loads(json.dumps(st.to_dict()))
    assert data["version"] == STATE_VERSION
    assert data["gpus"][0]["memory_free_bytes"] == 50
    back = AgentState.from_dict(data)
    assert back.to_dict() == st.to_dict()
    assert back.instance("b").sleep_level == 2
    assert back.find_model("sql").name == "a"
    assert back.find_model("zzz") is None


def test_state_reader_ignores_unknown_keys_and_refuses_other_versions():
    data = sample_state().to_dict()
    data["future_key"] = 1
    data["instances"][0]["future_field"] = "x"
    assert AgentState.from_dict(data).instances[0].name == "a"
    data["version"] = STATE_VERSION + 1
    with pytest.raises(StateVersionError):
        AgentState.from_dict(data)


def test_state_rejects_unknown_instance_state():
    data = sample_state().to_dict()
    data["instances"][0]["state"] = "dancing"
    with pytest.raises(ValueError):
        AgentState.from_dict(data)
