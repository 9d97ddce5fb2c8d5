"""A real server on 127.0.0.1 (uvicorn in a background thread, started once for the module)
over the session's embedded SmolLM2 (cpu-small), driven by the official openai client and
httpx: answers equal LLM.generate's, concurrent clients, a client that leaves mid-stream,
bad requests, a full queue."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

import httpx  # noqa: E402

from retrieval_attn import SamplingParams  # noqa: E402
from retrieval_attn.server.app import build_app, serve_in_thread  # noqa: E402
from retrieval_attn.server.scheduler import StepOutput  # noqa: E402

MODEL = "smollm2"


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    app: object
    http: httpx.Client

    @property
    def scheduler(self):
        return self.app.state.scheduler

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)


@contextmanager
def start_server(llm, **kwargs) -> Iterator[Running]:
    app = build_app(llm, MODEL, **kwargs)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        yield Running(url, app, http)


@pytest.fixture(scope="module")
def server(cpu_llm) -> Iterator[Running]:
    with start_server(cpu_llm, max_waiting=16) as running:
        yield running


def metric(running: Running, name: str) -> float:
    """One sample's value from /metrics (0 when absent)."""
    for line in running.http.get("/metrics").text.splitlines():
        if not line.startswith("#") and line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(llm, prompt, max_tokens: int, stop=None) -> str:
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, stop=stop))[0].text


def test_completion_equals_generate(server, cpu_llm):
    out = server.openai().completions.create(model=MODEL, prompt="Once upon a time",
                                             max_tokens=10, temperature=0)
    want = cpu_llm.generate("Once upon a time", SamplingParams(max_tokens=10))[0]
    assert out.choices[0].text == want.text
    assert out.choices[0].finish_reason == want.finish_reason == "length"
    assert out.id.startswith("cmpl-") and out.model == MODEL
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == \
        (len(want.prompt_token_ids), len(want.token_ids))


def test_chat_equals_generate(server, cpu_llm):
    out = server.openai().chat.completions.create(model=MODEL, messages=CAPITAL,
                                                  max_tokens=16, temperature=0)
    want = cpu_llm.generate(CAPITAL, SamplingParams(max_tokens=16))[0]
    assert "Paris" in want.text
    assert out.choices[0].message.content == want.text
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "stop" and out.id.startswith("chatcmpl-")
    assert out.usage.completion_tokens == len(want.token_ids)


def test_streaming_chat_equals_generate(server, cpu_llm):
    chunks = list(server.openai().chat.completions.create(
        model=MODEL, messages=CAPITAL, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(cpu_llm, CAPITAL, 16)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 2
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "stop" and set(finals[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices


def test_stop_strings_and_seed(server, cpu_llm):
    out = server.openai().chat.completions.create(model=MODEL, messages=CAPITAL,
                                                  max_tokens=16, stop=["Paris"])
    assert out.choices[0].message.content == greedy(cpu_llm, CAPITAL, 16, ["Paris"])
    assert out.choices[0].finish_reason == "stop"
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6,
            "temperature": 1.0, "top_k": 20, "seed": 7}
    a, b = (server.http.post("/v1/completions", json=body).json() for _ in range(2))
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_concurrent_clients_each_equal_the_request_alone(server, cpu_llm):
    prompts = ["Hi", "The capital of Germany is", "Once upon a time, in a land far away,",
               "List three colors:", "Water boils at", "The quick brown fox jumps over the",
               "Python is a programming language that", "One, two, three,"]
    alone = [greedy(cpu_llm, p, 8) for p in prompts]
    client = server.openai()

    def ask(i: int) -> str:
        if i % 2:
            stream = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8,
                                               temperature=0, stream=True)
            return "".join(c.choices[0].text for c in stream if c.choices)
        return client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=8,
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, range(len(prompts))))
    assert got == alone
    assert server.scheduler.num_running == server.scheduler.num_waiting == 0


def test_client_that_leaves_mid_stream_frees_its_sequence(server):
    cancelled = 'retrieval_attn_requests_total{outcome="cancelled"}'
    before = metric(server, cancelled)
    body = {"model": MODEL, "prompt": "Write a very long story about a dragon.",
            "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        data = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                data.append(json.loads(line[5:]))
            if len(data) == 2:
                break  # leave after two chunks: closing the response drops the connection
    deadline = time.monotonic() + 20
    while metric(server, cancelled) < before + 1:
        assert time.monotonic() < deadline, "the abandoned request was never cancelled"
        time.sleep(0.05)
    assert server.scheduler.num_running == 0 and server.scheduler.num_waiting == 0
    assert metric(server, "retrieval_attn_num_requests_running") == 0
    assert server.http.get("/health").status_code == 200


LONG = "word " * 5000  # over cpu-small's 4608-token context


@pytest.mark.parametrize(("path", "body", "status", "param", "says"), [
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "8"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", ">= 0"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("/v1/completions", {"prompt": "hi", "top_k": -2}, 400, "top_k", ">= 0"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "seed", "2**64"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop", "non-empty"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n", "one choice"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", "valid"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt", "required"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt", "vocabulary"),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 4}, 400, "prompt",
     "runtime.max_context_tokens is 4608"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages", "role"),
    ("/v1/chat/completions", {"messages": CAPITAL, "temperature": "hot"}, 400,
     "temperature", "valid number"),
], ids=lambda v: v if isinstance(v, int) else None)
def test_bad_request_gets_an_openai_error(server, path, body, status, param, says):
    r = server.http.post(path, json={"model": MODEL, **body} if "model" not in body else body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == status and says in err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_server_carries_on_after_bad_requests(server, cpu_llm):
    raw = [b'{"prompt": "hi", "temperature": NaN}', b"not json", b'{"prompt": "hi",']
    for body in raw:
        r = server.http.post("/v1/completions", content=body,
                             headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "temperature is nan" in server.http.post(
        "/v1/completions", content=raw[0],
        headers={"content-type": "application/json"}).json()["error"]["message"]
    assert server.http.get("/nowhere").json()["error"]["type"] == "not_found_error"
    assert server.http.get("/health").json() == {"status": "ok"}
    out = server.openai().completions.create(model=MODEL, prompt="Water boils at",
                                             max_tokens=4, temperature=0)
    assert out.choices[0].text == greedy(cpu_llm, "Water boils at", 4)


def test_models_and_metrics(server):
    models = server.openai().models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].max_model_len == 4608
    server.http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                              "max_tokens": 3})
    text = server.http.get("/metrics").text
    for name in ("retrieval_attn_requests_total", "retrieval_attn_prompt_tokens_total",
                 "retrieval_attn_generation_tokens_total",
                 "retrieval_attn_time_to_first_token_seconds_count",
                 "retrieval_attn_inter_token_latency_seconds_count",
                 "retrieval_attn_num_requests_waiting", 'retrieval_attn_kv_bytes{place="host"}'):
        assert name in text
    assert metric(server, "retrieval_attn_time_to_first_token_seconds_count") >= 1
    assert metric(server, 'retrieval_attn_kv_bytes{place="host"}') > 0  # cpu: dense on host
    assert server.http.get("/metrics/").status_code == 200


class GatedExecutor:
    """A fake engine whose steps wait for a gate: requests pile up in the queue."""

    max_running = 1

    def __init__(self) -> None:
        self.gate = threading.Event()

    def step(self, running):
        self.gate.wait(30)
        return [StepOutput(1, "x", "length") for _ in running]

    def free(self, seq) -> None:
        pass


def test_full_queue_answers_429(cpu_llm):
    fake = GatedExecutor()
    with start_server(cpu_llm, max_waiting=1, executor=fake) as running:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(running.http.post, "/v1/completions", json=body)
            _wait(lambda: running.scheduler.num_running == 1)
            second = pool.submit(running.http.post, "/v1/completions", json=body)
            _wait(lambda: running.scheduler.num_waiting == 1)
            r = running.http.post("/v1/completions", json=body)
            assert r.status_code == 429, r.text
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and "--max-waiting is 1" in err["message"]
            fake.gate.set()
            assert first.result().status_code == second.result().status_code == 200
        assert first.result().json()["choices"][0]["text"] == "x"
        assert metric(running, 'retrieval_attn_requests_total{outcome="rejected"}') == 1


def _wait(cond, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


DOC = ("Notes from the harbor office. The ferry to the island leaves at seven. The lighthouse "
       "keeper is named Ada Brook. The harbor's oldest boat is painted green. ")


def test_shared_context_answers_each_question_like_generate(server, cpu_llm):
    """one prefill of a document; three questions at once, each decoded on top of it,
    equal LLM.generate over the document's tokens + the question's"""
    r = server.http.post("/v1/contexts", json={"prompt": DOC})
    assert r.status_code == 200, r.text
    ctx = r.json()
    doc_ids = cpu_llm.encode(DOC)
    assert ctx["id"].startswith("ctx-") and ctx["prompt_tokens"] == len(doc_ids)
    assert [c["id"] for c in server.http.get("/v1/contexts").json()["data"]] == [ctx["id"]]
    questions = ["Q: When does the ferry leave? A:", "Q: Who keeps the lighthouse? A:",
                 "Q: What color is the oldest boat? A:"]
    want = [cpu_llm.generate({"prompt_token_ids": doc_ids + cpu_llm.encode(q)},
                             SamplingParams(max_tokens=6))[0].text for q in questions]
    client = server.openai()

    def ask(q: str):
        return client.completions.create(model=MODEL, prompt=q, max_tokens=6, temperature=0,
                                         extra_body={"context": ctx["id"]})

    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(ask, questions))
    assert [g.choices[0].text for g in got] == want
    assert got[0].usage.prompt_tokens == len(doc_ids) + len(cpu_llm.encode(questions[0]))

    gone = server.http.delete(f"/v1/contexts/{ctx['id']}")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert server.http.get("/v1/contexts").json()["data"] == []
    for r in (server.http.delete(f"/v1/contexts/{ctx['id']}"),
              server.http.post("/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                        "context": ctx["id"]})):
        assert r.status_code == 404 and r.json()["error"]["param"] == "context"
    bad = server.http.post("/v1/contexts", json={"path": "/nonexistent/ctx"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "path"
