"""The completions service end to end: real HTTP to a real ``serve.run`` on 127.0.0.1.

One application (auth on) serves a tiny random-init checkpoint, registered in a
temporary MLflow store and loaded as ``models:/tiny/1``, for the whole module;
every test talks to it over HTTP, except where a test also reaches the model
deployment's handle (an impossible request, killing the replica).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from mtp.checkpoint import save_checkpoint
from mtp.config import build_config
from mtp.decoding.api import SamplingParams
from mtp.model import MTPTransformer
from mtp.tokenizer import ByteTokenizer

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
APP = "mtp-test"
MAX_TOKENS_CAP = 96
MAX_BODY = 8192
PROMPTS = ["def add(a, b):\n    return", "import os\n", "class Stack:\n    def push(self, x):", "# sort a list\n"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = build_config(overrides={"train.preset": "debug"})
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt", MTPTransformer(cfg.model), cfg, ByteTokenizer())


@pytest.fixture(scope="module")
def registered(checkpoint, tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, models:/ URI) of the checkpoint registered in a fresh sqlite store."""
    from mlflow import MlflowClient

    from mtp.tracking.runs import CHECKPOINT_ARTIFACT, register_checkpoint

    root = tmp_path_factory.mktemp("mlflow")
    store = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(store, registry_uri=store)
    experiment = client.create_experiment("serve-test", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(checkpoint), CHECKPOINT_ARTIFACT)
    client.set_terminated(run_id)
    cfg = build_config(overrides={"train.preset": "debug", "tracking.tracking_uri": store,
                                  "tracking.registered_model": "tiny"})
    return store, register_checkpoint(cfg, run_id, checkpoint)


@pytest.fixture(scope="module")
def server(ray_cluster, registered) -> str:
    from ray import serve

    from mtp.serving.app import build_app
    from mtp.serving.config import API_KEY_ENV

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    previous = os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = API_KEY
    try:
        app = build_app({
            "model": registered[1],
            "tracking_uri": registered[0],
            "max_tokens_cap": MAX_TOKENS_CAP,
            "max_body_bytes": MAX_BODY,
            "max_choices": 8,
            "request_timeout_s": 60,
        })
    finally:
        if previous is None:
            os.environ.pop(API_KEY_ENV)
        else:
            os.environ[API_KEY_ENV] = previous
    try:
        serve.run(app, name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/health", timeout=30).status_code == 200
        yield url
    finally:
        serve.shutdown()


def test_serve_config_from_args(tmp_path, monkeypatch):
    from mtp.config import ConfigError
    from mtp.serving.config import ServeConfig

    monkeypatch.chdir(tmp_path)
    cfg = ServeConfig.from_args({"model": "ckpt", "engine": {"max_batch_size": 4, "tree": [2, 1]}})
    assert cfg.model == str(tmp_path / "ckpt") and cfg.served_name == "ckpt"  # absolute for the replicas
    assert cfg.engine.max_batch_size == 4 and cfg.engine.tree == (2, 1)
    assert ServeConfig.from_args(cfg.to_dict()) == cfg  # what the replicas receive
    cfg = ServeConfig.from_args({"model": "models:/mtp-model/3"})
    assert cfg.model == "models:/mtp-model/3" and cfg.served_name == "mtp-model"
    with pytest.raises(ConfigError, match="max_bach_size"):
        ServeConfig.from_args({"max_bach_size": 4})
    with pytest.raises(ConfigError, match="engine.max_batch_size=0"):
        ServeConfig.from_args({"model": "m", "engine": {"max_batch_size": 0}})
    with pytest.raises(ConfigError, match="serve.engine.max_bach_size: unknown key"):
        ServeConfig.from_args({"model": "m", "engine": {"max_bach_size": 4}})
    with pytest.raises(ConfigError, match="dtype"):
        ServeConfig.from_args({"model": "m", "engine": {"dtype": "int4"}})
    with pytest.raises(ConfigError, match="args.model"):
        ServeConfig.from_args({})


def test_deploy_config_pins_the_alias_and_carries_the_store(registered):
    """What `serve deploy` needs reaches the application through the config file alone."""
    import yaml

    from mtp.config import ConfigError
    from mtp.serving.deploy import SOURCE_ROOT, deploy_config

    store, model_uri = registered
    name, version = model_uri[len("models:/"):].split("/")
    from mlflow import MlflowClient

    MlflowClient(store, store).set_registered_model_alias(name, "champion", version)
    template = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve" / "config.yaml").read_text())
    config = deploy_config(template, f"models:/{name}@champion", tracking_uri=store, port=8123, autoscaling=(1, 2))
    app = config["applications"][0]
    assert app["args"]["model"] == model_uri and app["args"]["model_name"] == name
    assert app["args"]["tracking_uri"] == store and config["http_options"]["port"] == 8123
    assert app["runtime_env"]["env_vars"]["PYTHONPATH"] == str(SOURCE_ROOT)
    server = next(d for d in app["deployments"] if d["name"] == "ModelServer")
    assert "num_replicas" not in server and server["autoscaling_config"]["max_replicas"] == 2
    with pytest.raises(ConfigError, match="@nope"):
        deploy_config(template, f"models:/{name}@nope", tracking_uri=store)


def complete(url: str, **body) -> requests.Response:
    return requests.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=60)


def greedy_text(url: str, prompt: str, max_tokens: int = 24, speculative: bool = True) -> str:
    r = complete(url, prompt=prompt, max_tokens=max_tokens, temperature=0, speculative=speculative)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_completion_shape_and_usage(server):
    r = complete(server, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(PROMPTS[0].encode())
    assert 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["speculative"] is True and usage["forwards"] >= 1 and usage["tokens_per_forward"] >= 1.0


def test_speculative_off_gives_identical_greedy_text(server):
    for prompt in PROMPTS:
        r_spec = complete(server, prompt=prompt, max_tokens=32, temperature=0)
        r_plain = complete(server, prompt=prompt, max_tokens=32, temperature=0, speculative=False)
        assert r_spec.status_code == r_plain.status_code == 200
        assert r_spec.json()["choices"][0]["text"] == r_plain.json()["choices"][0]["text"]
        assert r_plain.json()["usage"]["speculative"] is False


def test_stop_sequence_truncates(server):
    full = greedy_text(server, PROMPTS[1], 40)
    start = next(i for i in range(3, len(full) - 1) if "\ufffd" not in full[i : i + 2])
    stop = full[start : start + 2]
    r = complete(server, prompt=PROMPTS[1], max_tokens=40, temperature=0, stop=[stop, "never-emitted"])
    (choice,) = r.json()["choices"]
    assert choice["text"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"


def test_prompt_list_n_and_seed(server):
    body = dict(prompt=PROMPTS[:2], n=2, max_tokens=10, temperature=1.0, seed=7)
    first, again = complete(server, **body), complete(server, **body)
    assert first.status_code == again.status_code == 200, first.text
    choices = first.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == [c["text"] for c in again.json()["choices"]]
    assert first.json()["usage"]["prompt_tokens"] == 2 * sum(len(p.encode()) for p in PROMPTS[:2])


def test_concurrent_requests_match_sequential_ones(server):
    expected = {p: greedy_text(server, p) for p in PROMPTS}
    jobs = PROMPTS * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda p: greedy_text(server, p), jobs))
    assert results == [expected[p] for p in jobs]


def _stream_events(url: str, started: threading.Event | None = None, **body) -> tuple[list[dict], list[float], bool]:
    """(parsed data chunks, arrival time of each, whether [DONE] closed the stream); sets
    ``started`` when the first chunk arrives."""
    events, times, done = [], [], False
    with requests.post(f"{url}/v1/completions", json={**body, "stream": True}, headers=AUTH, stream=True,
                       timeout=60) as r:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith(b"data: ")
            payload = line[len(b"data: "):]
            if payload == b"[DONE]":
                done = True
                continue
            assert not done, "data after [DONE]"
            events.append(json.loads(payload))
            times.append(time.perf_counter())
            if started is not None:
                started.set()
    return events, times, done


def _text_times(events: list[dict], times: list[float]) -> list[float]:
    return [t for e, t in zip(events, times) if e["choices"] and e["choices"][0]["text"]]


def test_streaming_is_incremental_and_matches_plain(server):
    prompt, max_tokens = PROMPTS[2], 80
    events, times, done = _stream_events(server, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         stream_options={"include_usage": True})
    assert done
    texts = [e["choices"][0]["text"] for e in events if e["choices"] and e["choices"][0]["text"]]
    assert len(texts) >= 5, "expected the text in several chunks"
    assert "".join(texts) == greedy_text(server, prompt, max_tokens)
    finals = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finals) == 1
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    text_times = _text_times(events, times)
    assert text_times[-1] - text_times[0] > 0.005, "all chunks arrived at once: the response was buffered"


def test_streaming_several_choices(server):
    events, _, done = _stream_events(server, prompt=PROMPTS[:2], max_tokens=16, temperature=0)
    assert done
    for index, prompt in enumerate(PROMPTS[:2]):
        text = "".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == index)
        assert text == greedy_text(server, prompt, 16)


def test_long_stream_does_not_block_short_requests(server):
    """Short plain requests sent while a long stream runs join its batch and finish first."""
    started = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        stream = pool.submit(_stream_events, server, started, prompt="#", max_tokens=MAX_TOKENS_CAP, temperature=0)
        assert started.wait(30), "the stream sent nothing"

        def short(prompt: str) -> float:
            greedy_text(server, prompt, 4)
            return time.perf_counter()

        shorts = list(pool.map(short, PROMPTS[:3]))
        events, times, done = stream.result(timeout=60)
    assert done
    assert max(shorts) < _text_times(events, times)[-1], "the short requests waited for the stream"


def test_concurrent_streams_interleave(server):
    """A second stream starts producing before the first one ends, and both match plain results."""
    started = threading.Event()
    body = dict(max_tokens=MAX_TOKENS_CAP, temperature=0)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_stream_events, server, started, prompt="#", **body)
        assert started.wait(30), "the first stream sent nothing"
        second = pool.submit(_stream_events, server, prompt="def", **body)
        (events_1, times_1, _), (events_2, times_2, _) = first.result(timeout=60), second.result(timeout=60)
    assert _text_times(events_2, times_2)[0] < _text_times(events_1, times_1)[-1], "the streams ran one after another"
    for prompt, events in (("#", events_1), ("def", events_2)):
        assert "".join(e["choices"][0]["text"] for e in events) == greedy_text(server, prompt, MAX_TOKENS_CAP)


LONG_PROMPT = "x" * 200  # the debug preset's context is 128 bytes


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"max_tokens": 4}, 400, "prompt"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": LONG_PROMPT, "max_tokens": 4}, 400, "prompt"),
        ({"prompt": "x" * 100, "max_tokens": 40}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "4"}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": MAX_TOKENS_CAP + 1}, 400, "max_tokens"),
        ({"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
        ({"prompt": "hi", "temperature": 2.5}, 400, "temperature"),
        ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
        ({"prompt": "hi", "top_k": 0}, 400, "top_k"),
        ({"prompt": "hi", "n": 0}, 400, "n"),
        ({"prompt": "hi", "n": 9}, 400, "n"),
        ({"prompt": "hi", "stop": 3}, 400, "stop"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ({"prompt": "hi", "seed": -1}, 400, "seed"),
        ({"prompt": "hi", "speculative": "no"}, 400, "speculative"),
        ({"prompt": "hi", "logit_bias": {}}, 400, "logit_bias"),
        ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ],
)
def test_validation_errors_name_the_field(server, body, status, param):
    r = requests.post(f"{server}/v1/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["message"] and error["type"]


def test_streamed_request_errors_are_plain_json(server):
    r = requests.post(f"{server}/v1/completions", json={"prompt": LONG_PROMPT, "stream": True}, headers=AUTH,
                      timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_malformed_json_is_400(server):
    r = requests.post(f"{server}/v1/completions", data=b"{not json", headers=AUTH, timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_oversized_bodies_are_refused(server):
    big = json.dumps({"prompt": "a" * (MAX_BODY + 1)}).encode()
    r = requests.post(f"{server}/v1/completions", data=big, headers={**AUTH, "Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # no Content-Length: a chunked body is counted as it arrives
    chunks = (big[i : i + 1024] for i in range(0, len(big), 1024))
    r = requests.post(f"{server}/v1/completions", data=chunks, headers=AUTH, timeout=30)
    assert r.status_code == 413


def test_bearer_auth(server):
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = requests.post(f"{server}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert requests.get(f"{server}/v1/models", timeout=30).status_code == 401
    assert requests.get(f"{server}/health", timeout=30).status_code == 200  # open for load balancers


def test_models_and_health_routes(server, registered):
    r = requests.get(f"{server}/v1/models", headers=AUTH, timeout=30)
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card["id"] == "tiny" and card["object"] == "model"
    assert card["source"] == registered[1] == "models:/tiny/1" and card["version"] == "1"
    assert card["max_seq_len"] == 128 and card["n_future"] == 4
    health = requests.get(f"{server}/health", timeout=30).json()
    assert health == {"status": "ok", "model": "tiny", "version": card["version"]}
    assert requests.get(f"{server}/v2/nothing", timeout=30).json()["error"]["code"] == "not_found"


def test_engine_error_leaves_replica_serving(server):
    """An impossible request sent past the ingress makes the engine raise, batched with good ones."""
    from ray import serve

    from mtp.serving.protocol import APIError

    handle = serve.get_deployment_handle("ModelServer", app_name=APP)
    before = handle.info.remote().result()["replica"]
    bad = [handle.complete.remote("hi", SamplingParams(max_new_tokens=4, temperature=-1.0)) for _ in range(2)]
    with ThreadPoolExecutor(4) as pool:
        good = list(pool.map(lambda p: greedy_text(server, p, 8), PROMPTS))
    for response in bad:
        with pytest.raises(APIError) as info:
            response.result(timeout_s=60)
        assert info.value.status == 400 and "temperature" in info.value.message
    assert good == [greedy_text(server, p, 8) for p in PROMPTS]
    assert handle.info.remote().result()["replica"] == before, "the replica was replaced"


def test_crashed_replica_is_replaced_and_clients_see_errors_not_hangs(server):
    """Kill the model replica mid-stream: every client gets an answer or an error, then Serve recovers."""
    import ray
    from ray import serve

    handle = serve.get_deployment_handle("ModelServer", app_name=APP)
    before = handle.info.remote().result()["replica"]
    replica = ray.get_actor(f"SERVE_REPLICA::{APP}#ModelServer#{before}", namespace="serve")

    def stream_outcome(prompt: str) -> str:
        """'done' (finished), 'error' (error event or status), raising only on a malformed end."""
        body = {"prompt": prompt, "max_tokens": 90, "temperature": 0, "stream": True}
        with requests.post(f"{server}/v1/completions", json=body, headers=AUTH, stream=True, timeout=90) as r:
            if r.status_code != 200:
                assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable", r.text
                return "error"
            events = [line[len(b"data: "):] for line in r.iter_lines() if line]
        assert events[-1] == b"[DONE]"
        last = json.loads(events[-2])
        if "error" in last:
            assert last["error"]["code"] == "unavailable"
            return "error"
        assert last["choices"][0]["finish_reason"] in ("stop", "length")
        return "done"

    with ThreadPoolExecutor(6) as pool:
        outcomes = [pool.submit(stream_outcome, p) for p in PROMPTS + PROMPTS[:2]]
        time.sleep(0.2)
        ray.kill(replica, no_restart=True)
        assert {f.result(timeout=90) for f in outcomes} <= {"done", "error"}

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            after = handle.info.remote().result(timeout_s=10)["replica"]
            if after != before:
                break
        except Exception:  # noqa: BLE001 - the replacement is still starting
            time.sleep(0.5)
    assert after != before, "Serve did not replace the killed replica"
    assert greedy_text(server, PROMPTS[0], 8) == greedy_text(server, PROMPTS[0], 8)


def test_an_imported_hugging_face_model_is_served_with_its_own_tokenizer(server, tmp_path):
    """Bring your own model, served: a Qwen2 checkpoint imported with three heads answers over
    HTTP with the engine's greedy text, through its own BPE tokenizer (whose ids are not bytes)."""
    pytest.importorskip("transformers")
    from ray import serve

    from _hf import hf_model, save_hf
    from mtp.checkpoint import load_model
    from mtp.decoding.config import EngineConfig
    from mtp.decoding.engine import Engine
    from mtp.importing.hf import import_hf
    from mtp.serving.app import build_app

    imported = import_hf(save_hf(hf_model("qwen2"), tmp_path / "hf"), tmp_path / "mtp", n_future=3)
    prompt = "def add(a, b):"
    model, tokenizer, _ = load_model(imported)
    expected = Engine(model, tokenizer, EngineConfig(device="cpu")).generate(
        [prompt], SamplingParams(max_new_tokens=10))[0].text
    serve.run(build_app({"model": str(imported), "max_tokens_cap": MAX_TOKENS_CAP, "request_timeout_s": 60}),
              name="imported", route_prefix="/imported")
    try:
        r = complete(f"{server}/imported", prompt=prompt, max_tokens=10, temperature=0)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "mtp" and body["choices"][0]["text"] == expected
        assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(prompt))
    finally:
        serve.delete("imported")
