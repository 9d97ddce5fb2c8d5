"""Serving benchmark: clients with Poisson arrivals and mixed prompt lengths against a real
server, driven by the official openai client; the same requests through the offline
engine (LLM.generate) in the same run, for the ratio.

Prints requests done and failed, output tokens per second (server and offline), time to
first token and inter-token latency (p50 / p99; streamed requests). With --check every
server answer is compared with the offline greedy answer to the same prompt: a soak
"loses nothing" when every request completes and every answer matches.

    python -m retrieval_attn.tools.bench_serve --config cpu-small --clients 8 --requests 32
    python -m retrieval_attn.tools.bench_serve --config cpu-small --clients 32 \\
        --duration 600 --prompt-tokens 16 64 --max-tokens 8 --check      # a CPU soak
    python -m retrieval_attn.tools.bench_serve --url http://127.0.0.1:8000 ...  # a running server
"""

from __future__ import annotations

import argparse
import queue
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from retrieval_attn import LLM, SamplingParams
from retrieval_attn.errors import ConfigError

WORDS = ("river stone light garden paper window silver morning engine story market "
         "orange forest letter signal harbor winter number circle bridge").split()


@dataclass
class Request:
    index: int
    prompt: str
    stream: bool


@dataclass
class Result:
    request: Request
    submitted: float  # time.monotonic() when the client sent it
    token_times: list[float] = field(default_factory=list)  # each chunk's arrival
    text: str = ""
    tokens: int = 0  # completion tokens (usage, or chunks when streamed)
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.submitted if self.token_times else None

    @property
    def gaps(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]


def make_prompts(llm: LLM, lengths: list[int], count: int, seed: int) -> list[str]:
    """count prompt texts of about lengths[i % len] tokens each (seeded words, cut to
    length by the model's tokenizer)."""
    rng = random.Random(seed)
    tok = llm.tokenizer
    prompts = []
    for i in range(count):
        n = lengths[i % len(lengths)]
        words = " ".join(rng.choice(WORDS) for _ in range(n))
        prompts.append(tok.decode(tok.encode(words)[:n]))
    return prompts


def run_clients(url: str, model: str, requests: list[Request], clients: int, rate: float,
                max_tokens: int, duration_s: float | None) -> list[Result]:
    """Send requests (cycled while duration_s lasts, else once each) from `clients`
    threads; arrivals are Poisson at `rate` per second (inf: as fast as clients free up)."""
    from openai import OpenAI

    todo: queue.Queue[Request | None] = queue.Queue(maxsize=clients)
    results: list[Result] = []
    lock = threading.Lock()

    def client() -> None:
        api = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)
        while (req := todo.get()) is not None:
            res = Result(req, time.monotonic())
            try:
                _send(api, model, req, max_tokens, res)
            except Exception as e:  # noqa: BLE001 - a failed request is a result
                res.error = f"{type(e).__name__}: {e}"
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    rng, start, i = random.Random(0), time.monotonic(), 0
    while (duration_s is None and i < len(requests)) or \
            (duration_s is not None and time.monotonic() - start < duration_s):
        if rate != float("inf"):
            time.sleep(rng.expovariate(rate))
        todo.put(requests[i % len(requests)])
        i += 1
    for _ in threads:
        todo.put(None)
    for t in threads:
        t.join()
    return results


def _send(api, model: str, req: Request, max_tokens: int, res: Result) -> None:
    kw = dict(model=model, prompt=req.prompt, max_tokens=max_tokens, temperature=0)
    if not req.stream:
        out = api.completions.create(**kw)
        res.token_times.append(time.monotonic())
        res.text, res.tokens = out.choices[0].text, out.usage.completion_tokens
        return
    for chunk in api.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].text:
            res.token_times.append(time.monotonic())
            res.text += chunk.choices[0].text
            res.tokens += 1


def offline(llm: LLM, prompts: list[str], max_tokens: int) -> tuple[list[str], float, int]:
    """Each distinct prompt through LLM.generate, one after another: texts, seconds,
    completion tokens."""
    params = SamplingParams(max_tokens=max_tokens)
    llm.generate(prompts[0], SamplingParams(max_tokens=2))  # warm-up: not timed
    start, texts, tokens = time.monotonic(), [], 0
    for p in prompts:
        out = llm.generate(p, params)[0]
        texts.append(out.text)
        tokens += len(out.token_ids)
    return texts, time.monotonic() - start, tokens


@contextmanager
def _server(llm: LLM, url: str | None, clients: int) -> Iterator[tuple[str, str]]:
    """(base URL, model name) of the server to load: url's, or one started here over llm
    for the run."""
    if url is not None:
        from openai import OpenAI

        yield url, OpenAI(base_url=f"{url}/v1", api_key="unused").models.list().data[0].id
        return
    from retrieval_attn.server.app import build_app, model_name_of, serve_in_thread

    name = model_name_of(llm)
    with serve_in_thread(build_app(llm, name, max_waiting=max(64, clients))) as own:
        yield own, name


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def table(results: list[Result], wall_s: float, offline_tps: float,
          expected: list[str] | None) -> list[str]:
    done = [r for r in results if r.error is None]
    tokens = sum(r.tokens for r in done)
    ttft = [r.ttft for r in done if r.request.stream and r.ttft is not None]
    gaps = [g for r in done if r.request.stream for g in r.gaps]
    tps = tokens / wall_s if wall_s > 0 else float("nan")
    lines = ["what                              value",
             f"requests done / failed            {len(done)} / {len(results) - len(done)}"]
    if expected is not None:
        wrong = sum(r.text != expected[r.request.index] for r in done)
        lines.append(f"answers unlike offline greedy     {wrong}")
    lines += [f"server output tok/s               {tps:.1f}  ({tokens} tokens in {wall_s:.1f} s)",
              f"offline output tok/s              {offline_tps:.1f}",
              f"server / offline                  {tps / offline_tps:.2f}x",
              f"TTFT p50 / p99 (ms)               {1e3 * percentile(ttft, .5):.1f} / "
              f"{1e3 * percentile(ttft, .99):.1f}",
              f"inter-token p50 / p99 (ms)        {1e3 * percentile(gaps, .5):.1f} / "
              f"{1e3 * percentile(gaps, .99):.1f}"]
    for r in [r for r in results if r.error is not None][:3]:
        lines.append(f"error (request {r.request.index}): {r.error[:200]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_serve", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="default")
    p.add_argument("--model", default=None)
    p.add_argument("--url", default=None,
                   help="a running server's base URL (default: start one in this process "
                        "over --config/--model)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32, help="distinct prompts")
    p.add_argument("--duration", type=float, default=None, metavar="S",
                   help="keep sending (cycling the prompts) for S seconds: a soak")
    p.add_argument("--rate", type=float, default=float("inf"),
                   help="Poisson arrivals per second (default: as fast as clients free up)")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--stream-share", type=float, default=0.5,
                   help="share of requests streamed (TTFT and inter-token latency come "
                        "from these)")
    p.add_argument("--check", action="store_true",
                   help="compare every answer with the offline greedy answer")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or min(args.prompt_tokens) < 1 \
            or args.max_tokens < 1 or not 0 <= args.stream_share <= 1 or args.rate <= 0:
        raise ConfigError("bench_serve: --clients, --requests, --prompt-tokens, --max-tokens "
                          "and --rate must be positive, --stream-share within 0..1")

    llm = LLM(args.model, config=args.config)
    prompts = make_prompts(llm, args.prompt_tokens, args.requests, args.seed)
    rng = random.Random(args.seed)
    requests = [Request(i, text, rng.random() < args.stream_share)
                for i, text in enumerate(prompts)]
    expected, offline_s, offline_tokens = offline(llm, prompts, args.max_tokens)
    print(f"offline: {len(prompts)} prompts, {offline_tokens} tokens in {offline_s:.1f} s",
          flush=True)
    with _server(llm, args.url, args.clients) as (url, name):
        start = time.monotonic()
        results = run_clients(url, name, requests, args.clients, args.rate, args.max_tokens,
                              args.duration)
    wall = time.monotonic() - start
    print(f"\n{args.clients} clients, prompts of {args.prompt_tokens} tokens, "
          f"{args.max_tokens} new tokens, {llm.loaded.source}")
    print("\n".join(table(results, wall, offline_tokens / offline_s,
                          expected if args.check else None)))
    failed = any(r.error for r in results) or (
        args.check and any(r.text != expected[r.request.index] for r in results))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
