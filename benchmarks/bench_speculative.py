"""MTP speculative decoding on the bundled model: decode speed with and without speculation, same run.

    python3 benchmarks/bench_speculative.py                    # models/hylm-tiny, K=3, batch 1 and 8
    python3 benchmarks/bench_speculative.py --k 1,2,3 --batch 1,8 --prompts 16 --max-tokens 256

Prompts are held-out curriculum conversations (seeds >= 10**9, never trained on) of the tasks that produce
long answers (reasoned arithmetic, tool calls, list tasks). For each batch size the same prompts run through
an engine without speculation and one with K MTP drafts per step; greedy outputs must be identical (checked).
Prints output tok/s and the speedup end to end (prompts' prefill included), the decode speedup (time per output
token after each request's first, as a user streaming the answer sees it: plain over speculative), the draft
acceptance rate and the mean tokens per verification step, and the decode roofline fraction of the plain run
(weights read once per step over measured memory bandwidth).
With --repeats N the plain and speculative runs alternate N times and the row shows the median run (and the
range of the speedups); a speculative output that differs from the plain one stops the benchmark.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu import active_weight_bytes, measure_bandwidth  # noqa: E402

import hylm  # noqa: E402
from hylm.chat import ChatTemplate, Tokenizer  # noqa: E402
from hylm.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from hylm.engine.sampling_params import SamplingParams  # noqa: E402
from hylm.train import curriculum  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "hylm-tiny"
TASKS = ("arith_think", "arith_low_effort", "tool_call", "sort", "reverse")


def held_out_prompts(model_dir: Path, n: int) -> list[list[int]]:
    tok, tpl = Tokenizer.from_dir(model_dir), ChatTemplate.from_dir(model_dir)
    prompts = []
    for i in range(n):
        ex = curriculum.generate_example(TASKS[i % len(TASKS)], random.Random(curriculum.EVAL_SEED_BASE + i))
        prompts.append(tok.encode(curriculum.render_prompt(ex, tpl, ex.assistant_turns()[0])))
    return prompts


def run(model, prompts: list[list[int]], batch: int, k: int, max_tokens: int, stop: list[int],
        temperature: float = 0.0):
    """All prompts through one engine (`batch` sequences at a time); returns (outputs, seconds, metrics, seconds
    per decoded token)."""
    longest = max(len(p) for p in prompts) + max_tokens + k + 8
    engine = LLMEngine(model, EngineConfig(max_num_seqs=batch, max_model_len=longest, speculative_tokens=k,
                                           enable_prefix_caching=False))
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, stop_token_ids=stop, seed=0)
    outputs: dict[int, list[int]] = {}
    first: dict[str, float] = {}  # request -> when its first token came out
    decode = 0.0  # summed over requests: first token to last (the prompt's prefill excluded)
    t = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            first.setdefault(out.request_id, now)
            if out.finished:
                decode += now - first[out.request_id]
    seconds = time.perf_counter() - t
    outs = [outputs.get(i, []) for i in ids]
    decoded = sum(len(o) - 1 for o in outs)  # tokens after each request's first
    return outs, seconds, engine.metrics, decode / max(1, decoded)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--k", default="3", help="draft tokens per step, comma-separated (default 3)")
    ap.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per batch size (default 8; at least the batch)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature (seed 0 per request): outputs then differ between the runs, so "
                         "the identity check is off and speedups compare tokens per second (default 0: greedy)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="plain and speculative runs alternate this many times; the table reports the median "
                         "speedup (this machine's speed drifts by 25%% between runs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    model = hylm.load_model(model_dir, dtype=torch.float32)
    tok = Tokenizer.from_dir(model_dir)
    stop = sorted(set(tok.eos_token_ids))
    bw = measure_bandwidth()
    weight_bytes = active_weight_bytes(model)
    print(f"# {model_dir.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{torch.get_num_threads()} threads, read bandwidth {bw / 1e9:.1f} GB/s")
    greedy = args.temperature == 0
    print(f"# prompts: held-out {', '.join(TASKS)}; "
          f"{'greedy' if greedy else f'sampled at temperature {args.temperature}'}; max_tokens {args.max_tokens}")
    print("| batch | K | plain tok/s | spec tok/s | speedup | decode speedup | acceptance | tokens/step | identical | "
          "plain roofline frac |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    run(model, held_out_prompts(model_dir, 2), 2, 0, 16, stop)  # warm-up: allocator, thread pool
    for batch in [int(b) for b in args.batch.split(",")]:
        prompts = held_out_prompts(model_dir, max(args.prompts, batch))
        for k in [int(x) for x in args.k.split(",")]:
            rows = []  # (plain tok/s, spec tok/s, plain / spec time per decoded token) per repeat, back to back
            for rep in range(max(1, args.repeats)):
                plain, t_plain, _, tpot_plain = run(model, prompts, batch, 0, args.max_tokens, stop, args.temperature)
                spec, t_spec, m_spec, tpot_spec = run(model, prompts, batch, k, args.max_tokens, stop, args.temperature)
                if spec != plain and greedy:
                    raise SystemExit(f"batch {batch} K={k}: speculative output differs from plain decoding")
                # sampled runs emit other tokens, so other lengths: compare rates, not times
                rows.append((sum(map(len, plain)) / t_plain, sum(map(len, spec)) / t_spec, tpot_plain / tpot_spec))
                if args.repeats > 1:
                    print(f"#   batch {batch} K={k} run {rep + 1}: plain {t_plain:.2f} s, spec {t_spec:.2f} s, "
                          f"speedup {rows[-1][1] / rows[-1][0]:.2f}x, decode {rows[-1][2]:.2f}x", flush=True)
            speedups = sorted(r[1] / r[0] for r in rows)
            plain_rate, spec_rate, _ = sorted(rows, key=lambda r: r[1] / r[0])[len(rows) // 2]  # the median run
            decode_speedups = sorted(r[2] for r in rows)
            # each plain decode step reads the active weights once for the whole batch
            roofline_tok_s = bw / weight_bytes * min(batch, len(prompts))
            print(f"| {batch} | {k} | {plain_rate:.1f} | {spec_rate:.1f} | {spec_rate / plain_rate:.2f}x"
                  + (f" (runs {speedups[0]:.2f}-{speedups[-1]:.2f}x)" if len(rows) > 1 else "")
                  + f" | {decode_speedups[len(rows) // 2]:.2f}x"
                  + (f" ({decode_speedups[0]:.2f}-{decode_speedups[-1]:.2f}x)" if len(rows) > 1 else "")
                  + f" | {m_spec.spec_acceptance_rate:.2f} | {m_spec.spec_mean_accepted_length:.2f} | "
                  f"{'yes' if greedy else 'n/a'} | "
                  f"{plain_rate / roofline_tok_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
