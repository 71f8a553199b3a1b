"""MTP speculative decoding on the bundled model: decode speed with and without speculation, same run.

    python3 benchmarks/bench_speculative.py                    # models/hylm-tiny, K=3, batch 1 and 8
    python3 benchmarks/bench_speculative.py --k 1,3,5,5:0.9 --batch 1,8 --prompts 16 --max-tokens 256

Prompts are held-out curriculum conversations (seeds >= 10**9, never trained on) of the tasks that produce
long answers (reasoned arithmetic, tool calls, list tasks). For each batch size b the prompts run in groups of b
through an engine without speculation and through one per speculative setting (K MTP drafts per step, or with
`K:P` at most K, drafting stopped below MTP confidence P: --speculative-min-confidence), in a shuffled order per
group, so that the machine's drifting speed (25% and more between runs here) falls on all of them alike; greedy
outputs must be identical (checked; a difference stops the benchmark). Prints output tok/s and the speedup end
to end (prompts' prefill included), the decode speedup (time per output token after each request's first, as a
user streaming the answer sees it: plain over speculative), the draft acceptance rate and the mean tokens per
verification step, and the decode roofline fraction of the plain run (weights read once per step over measured
memory bandwidth). Totals are over --repeats passes; the range is that of the single passes' speedups.
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
        temperature: float = 0.0, min_confidence: float = 0.0):
    """All prompts through one engine (`batch` sequences at a time); returns (outputs, seconds, metrics, seconds
    per decoded token)."""
    longest = max(len(p) for p in prompts) + max_tokens + k + 8
    engine = LLMEngine(model, EngineConfig(max_num_seqs=batch, max_model_len=longest, speculative_tokens=k,
                                           speculative_min_confidence=min_confidence, enable_prefix_caching=False))
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
    ap.add_argument("--k", default="3", help="speculative settings, comma-separated: K drafts per step, or K:P for at "
                                           "most K drafts stopped below MTP confidence P (default 3)")
    ap.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per batch size (default 8; at least the batch)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sample at this temperature (seed 0 per request): outputs then differ between the runs, so "
                         "the identity check is off and speedups compare tokens per second (default 0: greedy)")
    ap.add_argument("--repeats", type=int, default=1, help="passes over the prompts (default 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = []  # (K, min confidence)
    for item in args.k.split(","):
        k, _, p = item.partition(":")
        settings.append((int(k), float(p) if p else 0.0))
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
    run(model, held_out_prompts(model_dir, 2), 2, 0, 16, stop)  # warm-up: allocator, thread pool
    rows = []
    order = random.Random(0)
    for batch in [int(b) for b in args.batch.split(",")]:
        prompts = held_out_prompts(model_dir, max(args.prompts, batch))
        groups = [prompts[i: i + batch] for i in range(0, len(prompts), batch)]
        configs = [(0, 0.0)] + settings
        # per config: output tokens, seconds, decoded tokens, decode seconds, drafts, accepted, steps; per pass too
        totals = {c: [0, 0.0, 0, 0.0, 0, 0, 0] for c in configs}
        passes: dict = {c: [] for c in configs}
        for rep in range(max(1, args.repeats)):
            this_pass = {c: [0, 0.0, 0, 0.0] for c in configs}
            for group in groups:
                outputs = {}
                for c in order.sample(configs, len(configs)):
                    outs, seconds, metrics, tpot = run(model, group, batch, c[0], args.max_tokens, stop,
                                                       args.temperature, c[1])
                    outputs[c] = outs
                    decoded = sum(len(o) - 1 for o in outs)
                    for acc in (totals[c], this_pass[c]):
                        acc[0] += sum(map(len, outs))
                        acc[1] += seconds
                        acc[2] += decoded
                        acc[3] += tpot * decoded
                    totals[c][4] += metrics.spec_draft_tokens
                    totals[c][5] += metrics.spec_accepted_tokens
                    totals[c][6] += metrics.spec_steps
                if greedy and any(outputs[c] != outputs[(0, 0.0)] for c in settings):
                    raise SystemExit(f"batch {batch}: speculative output differs from plain decoding")
            for c in configs:
                passes[c].append(this_pass[c])
            plain = this_pass[(0, 0.0)]
            print(f"#   batch {batch} pass {rep + 1}: plain {plain[3] / plain[2] * 1e3:.3f} ms/token; "
                  + ", ".join(f"K={k}{f':{p}' if p else ''} decode {plain[3] / plain[2] / (v[3] / v[2]):.2f}x"
                              for (k, p), v in ((c, this_pass[c]) for c in settings)), flush=True)
        base = totals[(0, 0.0)]
        roofline_tok_s = bw / weight_bytes * batch  # each plain decode step reads the active weights once
        for c in settings:
            t = totals[c]
            rate, plain_rate = t[0] / t[1], base[0] / base[1]
            ranges = sorted((p[0] / p[1]) / (b[0] / b[1]) for p, b in zip(passes[c], passes[(0, 0.0)]))
            decode_ranges = sorted((b[3] / b[2]) / (p[3] / p[2]) for p, b in zip(passes[c], passes[(0, 0.0)]))
            span = (lambda r: f" ({r[0]:.2f}-{r[-1]:.2f}x)" if len(r) > 1 else "")
            rows.append(f"| {batch} | {c[0]} | {c[1] or '-'} | {plain_rate:.1f} | {rate:.1f} | "
                        f"{rate / plain_rate:.2f}x{span(ranges)} | "
                        f"{(base[3] / base[2]) / (t[3] / t[2]):.2f}x{span(decode_ranges)} | "
                        f"{t[5] / max(1, t[4]):.2f} | {(t[5] + t[6]) / max(1, t[6]):.2f} | "
                        f"{'yes' if greedy else 'n/a'} | {plain_rate / roofline_tok_s:.2f} |")
    print("| batch | K | min conf | plain tok/s | spec tok/s | speedup | decode speedup | acceptance | tokens/step | "
          "identical | plain roofline frac |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
