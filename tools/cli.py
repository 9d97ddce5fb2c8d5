"""retrieval-attn: command-line entry point (generate, niah, eval, plan, check-plan, bench,
save-context, inspect)."""

from __future__ import annotations

import argparse
import logging
import sys

from retrieval_attn import LLM, SamplingParams
from retrieval_attn.errors import RetrievalAttnError


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
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed")
    _common(gen)
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--raw", action="store_true",
                     help="feed the prompt as plain text, without the chat template")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")

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
    save.add_argument("out", help="folder to write")
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
        llm = LLM(model=args.model, config=args.config)
        if args.command == "save-context":
            return _save_context(llm, args)
        return _generate(llm, args) if args.command == "generate" else _niah(llm, args)

    return _guarded(run)


def _guarded(run) -> int:
    """Run a command; user errors become one line on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run()
    except RetrievalAttnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="default",
                   help="preset name (default, cpu-small) or a YAML file")
    p.add_argument("--model", default=None,
                   help="HF checkpoint dir or .gguf file (default: the config's model)")


def _generate(llm: LLM, args: argparse.Namespace) -> int:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
    use_chat = not args.raw and llm.tokenizer is not None and llm.tokenizer.hf.chat_template
    prompt = [{"role": "user", "content": args.prompt}] if use_chat else args.prompt
    for piece in llm.stream(prompt, params):
        print(piece, end="", flush=True)
    print()
    return 0


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
    path = llm.save_context(prompt, args.out)
    print(f"saved {len(llm.encode(prompt))} tokens to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
