"""Time to first token per turn of a 10-turn chat: hylm with prefix caching, hylm without, transformers.

    python3 benchmarks/bench_prefix_cache.py [--turns 10] [--user-tokens 200] [--answer-tokens 32]

Every turn's prompt is the whole conversation so far plus a new user message (random token ids on the
benchmark model of bench_cpu.py). Without a state cache a hybrid model re-reads the conversation each
turn; with one, hylm resumes from the checkpoint taken at the end of the previous answer.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cpu import BENCH, hf_prefill, load_transformers  # noqa: E402

import hylm  # noqa: E402
from hylm.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from hylm.engine.sampling_params import SamplingParams  # noqa: E402
from hylm.weights import save_hf_checkpoint  # noqa: E402


def ttft(eng: LLMEngine, prompt: list[int], answer_tokens: int) -> tuple[float, list[int]]:
    t = time.perf_counter()
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=answer_tokens, ignore_eos=True))
    first, out = None, []
    while eng.has_unfinished():
        for o in eng.step():
            if first is None:
                first = time.perf_counter() - t
            if o.finished:
                out = o.output_ids
    return first, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--user-tokens", type=int, default=200)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = hylm.load_model(BENCH, seed=0)
    hf = None
    if not args.no_transformers:
        tmp = Path("/tmp/hylm-bench-model")
        save_hf_checkpoint(model, tmp)
        hf = load_transformers(tmp)
    cfg = dict(max_num_seqs=1, max_model_len=args.turns * (args.user_tokens + args.answer_tokens) + 64,
               max_num_batched_tokens=4096)
    cached = LLMEngine(model, EngineConfig(**cfg, enable_prefix_caching=True))
    plain = LLMEngine(model, EngineConfig(**cfg))
    ttft(plain, torch.randint(3, BENCH.vocab_size, (64,)).tolist(), 2)  # warm-up
    history: list[int] = []
    print(f"# {args.turns} turns, {args.user_tokens} new user tokens and {args.answer_tokens} answer tokens per turn")
    print("| turn | prompt tokens | hylm cached TTFT ms | hylm uncached TTFT ms | transformers TTFT ms | speedup vs uncached |")
    print("|---:|---:|---:|---:|---:|---:|")
    for turn in range(1, args.turns + 1):
        prompt = history + torch.randint(3, BENCH.vocab_size, (args.user_tokens,)).tolist()
        c, out = ttft(cached, prompt, args.answer_tokens)
        u, out_plain = ttft(plain, prompt, args.answer_tokens)
        assert out == out_plain, "prefix caching changed the output"
        h = len(prompt) / hf_prefill(hf, len(prompt)) if hf is not None else None
        hs = f"{h * 1e3:,.1f}" if h is not None else "-"
        print(f"| {turn} | {len(prompt)} | {c * 1e3:,.1f} | {u * 1e3:,.1f} | {hs} | {u / c:.1f}x |", flush=True)
        history = prompt + out
    st = cached.prefix_cache.stats
    print(f"\nprefix cache: {st.hits} hits, misses {st.misses}, {st.tokens_reused} tokens reused, "
          f"{st.bytes_used / 2**20:.1f} MiB of {st.budget_bytes / 2**20:.1f} MiB used")


if __name__ == "__main__":
    main()
