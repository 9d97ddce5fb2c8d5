"""retrieval-attn: command-line entry point (generate, serve, niah, eval, plan, check-plan,
bench, save-context, inspect)."""

from __future__ import annotations

import argparse
import logging
import sys

from retrieval_attn import LLM, RequestOutput, SamplingParams, __version__
from retrieval_attn.config import preset_names
from retrieval_attn.context import SavedContext, check_target, read_manifest
from retrieval_attn.errors import RequestError, RetrievalAttnError
from retrieval_attn.model.loader import model_names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # its own argument parser: long-context evaluation
        from retrieval_attn.tools.eval_longctx import main as eval_main

        return _guarded(lambda: eval_main(argv[1:]))
    if argv[:1] == ["plan"]:  # its own argument parser: the memory planner
        from retrieval_attn.tools.plan import main as plan_main

        return _guarded(lambda: plan_main(argv[1:]))
    if argv[:1] == ["inspect"]:  # its own argument parser: saved-context index inspection
        from retrieval_attn.tools.inspect_index import main as inspect_main

        return _guarded(lambda: inspect_main(argv[1:]))
    if argv[:1] == ["bench"]:  # its own argument parser: decode speed against baselines
        from retrieval_attn.tools.bench_decode import main as bench_main

        return _guarded(lambda: bench_main(argv[1:]))
    if argv[:1] == ["check-plan"]:  # its own argument parser: planned vs measured memory
        from retrieval_attn.tools.check_plan import main as check_main

        return _guarded(lambda: check_main(argv[1:]))
    parser = argparse.ArgumentParser(prog="retrieval-attn", description=__doc__)
    parser.add_argument("--version", action="version", version=f"retrieval-attn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt (or from a saved "
                         "context), streamed; finish reason and speed go to stderr")
    _common(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--context", metavar="DIR",
                        help="decode from a context saved by save-context (LLM.load_context) "
                             "instead of prefilling a prompt; give the --config and --model "
                             "it was saved with")
    gen.add_argument("--raw", action="store_true",
                     help="feed the prompt as plain text, without the chat template")
    gen.add_argument("--max-tokens", type=int, default=256, help="new tokens at most")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature, >= 0; 0 (default) decodes greedily")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="nucleus sampling: keep the most likely tokens up to this much "
                          "probability mass, in (0, 1]; 1 keeps all")
    gen.add_argument("--top-k", type=int, default=0,
                     help="keep the k most likely tokens; 0 keeps all")
    gen.add_argument("--seed", type=int, default=None,
                     help="seed of the random draws (0 to 2**64 - 1): the same seed gives "
                          "the same text; default: unseeded")
    gen.add_argument("--stop", action="append", default=[],
                     help="stop string: generation ends before it (repeatable)")

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: /v1/completions, "
                           "/v1/chat/completions, /v1/models, /health, /metrics (needs the "
                           "serve extra: pip install 'retrieval-attn[serve]')")
    _common(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only; "
                            "0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--max-waiting", type=int, default=64,
                       help="requests that may wait for the engine; more are answered 429 "
                            "(default 64)")
    serve.add_argument("--served-model-name", default=None,
                       help="the name clients pass as `model` (default: the model file's or "
                            "folder's name; GET /v1/models lists it)")

    niah = sub.add_parser("niah", help="needle-in-a-haystack demo on the shipped essays")
    _common(niah)
    niah.add_argument("--length", type=int, nargs="+", default=[4096],
                      help="prompt length(s) in tokens")
    niah.add_argument("--depth", type=float, nargs="+", default=[0.5],
                      help="needle depth(s), 0 = start of the text, 1 = end")
    niah.add_argument("--seed", type=int, default=0)
    save = sub.add_parser("save-context", help="prefill a prompt and save its KV state and "
                          "indexes to a folder (LLM.save_context)")
    _common(save)
    save.add_argument("out", help="folder to write (new or empty)")
    save.add_argument("--overwrite", action="store_true",
                      help="replace a context already saved in that folder (or write into "
                           "a folder that holds other files)")
    what = save.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt text (chat template applied)")
    what.add_argument("--niah", type=int, metavar="TOKENS",
                      help="a needle-in-a-haystack prompt of about this many tokens")
    sub.add_parser("eval", help="long-context accuracy of every KV policy (see eval --help)")
    sub.add_parser("plan", help="memory of every part of a run and the best config that fits "
                   "(see plan --help)")
    sub.add_parser("inspect", help="recall vs keys visited of a saved context's indexes "
                   "(see inspect --help)")
    sub.add_parser("bench", help="decode ms/token of retrieval vs dense vs full offload at "
                   "long contexts, one table (GPU; see bench --help)")
    sub.add_parser("check-plan", help="a config's planned vs measured GPU and host memory "
                   "(see check-plan --help)")

    args = parser.parse_args(argv)

    def run() -> int:
        # bad flags, paths and contexts are refused before the model loads
        if args.command == "serve":
            return _serve(args)
        if args.command == "generate":
            params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                    top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                    stop=args.stop)
            if args.context is not None:
                read_manifest(args.context)
        elif args.command == "save-context":
            check_target(args.out, args.overwrite)
        llm = LLM(model=args.model, config=args.config)
        if args.command == "save-context":
            return _save_context(llm, args)
        return _generate(llm, args, params) if args.command == "generate" else _niah(llm, args)

    return _guarded(run)


def _guarded(run) -> int:
    """Run a command; user errors become one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # faiss logs each CPU build it fails to load (ModuleNotFoundError lines) before the one it
    # loads: noise that reads as an error
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        return run()
    except RetrievalAttnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="default",
                   help=f"preset name ({', '.join(preset_names())}) or a YAML file")
    p.add_argument("--model", default=None,
                   help="HF checkpoint dir, .gguf file, or a model name "
                        f"({', '.join(model_names())}); default: the config's model")


def _generate(llm: LLM, args: argparse.Namespace, params: SamplingParams) -> int:
    if args.context is not None:
        prompt = llm.load_context(args.context)
    else:
        use_chat = not args.raw and llm.tokenizer is not None and llm.tokenizer.hf.chat_template
        prompt = [{"role": "user", "content": args.prompt}] if use_chat else args.prompt
    stream = llm.stream(prompt, params)
    while True:
        try:
            print(next(stream), end="", flush=True)
        except StopIteration as done:
            out = done.value
            break
    print()
    print(summary(out), file=sys.stderr)
    return 0


def summary(out: RequestOutput) -> str:
    """One line on how a request ended and how fast it ran."""
    t = out.timings
    why = {"stop": "end of text or a stop string",
           "length": "max_tokens or the context's end reached"}.get(out.finish_reason, "")
    prefill = "loaded" if isinstance(out.prompt, SavedContext) else "prefill"
    return (f"[finish: {out.finish_reason} ({why}); {t.generated_tokens} new tokens; "
            f"{prefill} {t.prompt_tokens} tokens in {t.prefill_s:.2f} s "
            f"({t.prefill_tokens_per_s:.0f} tok/s); decode {t.decode_tokens_per_s:.1f} tok/s]")


def _serve(args: argparse.Namespace) -> int:
    if args.max_waiting < 1:
        raise RequestError(f"--max-waiting is {args.max_waiting}: it must be at least 1")
    if not 0 <= args.port < 65536:
        raise RequestError(f"--port is {args.port}: it must be in 0..65535")
    try:  # the server's packages are an optional extra: import them only here
        from retrieval_attn.server.app import serve
    except ImportError as e:
        raise RequestError(f"retrieval-attn serve needs {e.name}: install the serve extra, "
                           "pip install 'retrieval-attn[serve]'") from None
    return serve(args.model, args.config, args.host, args.port, args.max_waiting,
                 args.served_model_name)


def _niah(llm: LLM, args: argparse.Namespace) -> int:
    from retrieval_attn.tools.niah import run_niah

    rows = []
    for length in args.length:
        for depth in args.depth:
            r = run_niah(llm, length, depth, seed=args.seed)
            rows.append(r)
            verdict = "FOUND" if r.found else "MISSED"
            print(f"{verdict}: length {r.prompt_tokens} tokens, depth {depth:.2f}, "
                  f"needle {r.value}, answer {r.answer!r} "
                  f"(prefill {r.prefill_tokens_per_s:.0f} tok/s)", flush=True)
    found = sum(r.found for r in rows)
    print(f"needle found in {found}/{len(rows)} prompts "
          f"(kv.policy={llm.config.kv.policy}, device={llm.device})")
    return 0 if found == len(rows) else 1


def _save_context(llm: LLM, args: argparse.Namespace) -> int:
    from retrieval_attn.tools.niah import build_prompt

    if args.prompt is not None:
        prompt = [{"role": "user", "content": args.prompt}]
    else:
        prompt = build_prompt(llm, args.niah, 0.5, "7305519")
    path = llm.save_context(prompt, args.out, overwrite=args.overwrite)
    print(f"saved {len(llm.encode(prompt))} tokens to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
