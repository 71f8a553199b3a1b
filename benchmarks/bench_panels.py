"""Packed weight panels (rows.h ROWS_PANELS) against the column-major kernels, same run.

    python3 benchmarks/bench_panels.py                 # hylm-tiny and bench_cpu.py's model, batch 1 and 8
    python3 benchmarks/bench_panels.py --repeats 5 --batch 1,8,32

Two copies of each model in one process: one whose native plans and linear() read panels (hylm.ops.linear's
default), one built with packing off (PACK_MAX_ELEMENTS = 0, so its plans keep the column-major weights). Decode
runs alternate between them in a shuffled order per repeat, so the machine's drifting speed falls on both; each
row is the median of the repeats, time per decoded token, and the ratio. The two copies' outputs are identical
(the panels sum in the same order; tests/test_linear_op.py checks the kernels bit for bit).
hylm-tiny decodes held-out curriculum prompts (benchmarks/bench_speculative.py's; time per token per request after
its first, what a streaming user sees); bench_cpu.py's model decodes from random 256-token contexts (the inverse of
the batch's aggregate token rate, as bench_cpu.py reports it).
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

from bench_cpu import BENCH, hylm_decode  # noqa: E402
from bench_speculative import DEFAULT_MODEL, held_out_prompts  # noqa: E402

import hylm  # noqa: E402
from hylm.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from hylm.engine.sampling_params import SamplingParams  # noqa: E402
from hylm.ops import linear as linear_op  # noqa: E402

PACKED = linear_op.PACK_MAX_ELEMENTS


def tiny_decode(model, prompts: list[list[int]], batch: int, max_tokens: int) -> float:
    """Seconds per decoded token (after each request's first) of the prompts through one engine."""
    engine = LLMEngine(model, EngineConfig(max_num_seqs=batch, max_model_len=max(map(len, prompts)) + max_tokens + 8))
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    first: dict[str, float] = {}
    decode, decoded = 0.0, 0
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            first.setdefault(out.request_id, now)
            if out.finished:
                decode += now - first[out.request_id]
                decoded += len(out.output_ids) - 1
    return decode / max(1, decoded)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="1,8", help="batch sizes (default 1,8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",")]
    prompts = held_out_prompts(DEFAULT_MODEL, 16)
    cases = {  # name -> (load, seconds per token for a batch size)
        "hylm-tiny": (lambda: hylm.load_model(DEFAULT_MODEL, dtype=torch.float32),
                      lambda m, b: tiny_decode(m, prompts[: max(b, 8)], b, 128)),
        "bench_cpu model": (lambda: hylm.load_model(BENCH, seed=0), lambda m, b: 1.0 / hylm_decode(m, b, 256, 32)),
    }
    print(f"# {torch.get_num_threads()} threads; ms per decoded token, median of {args.repeats} alternating runs")
    print("| model | batch | panels ms/token | column-major ms/token | panels speedup |")
    print("|---|---|---|---|---|")
    order = random.Random(0)
    for name, (load, decode) in cases.items():
        models = {"panels": load(), "column-major": load()}
        times: dict = {}
        for rep in range(args.repeats):
            for b in batches:
                for kind in order.sample(list(models), 2):
                    # plans are built on first use and kept: each copy keeps the layout it was first run with
                    linear_op.PACK_MAX_ELEMENTS = PACKED if kind == "panels" else 0
                    with torch.inference_mode():
                        times.setdefault((b, kind), []).append(decode(models[kind], b))
        linear_op.PACK_MAX_ELEMENTS = PACKED
        for b in batches:
            p, c = (sorted(times[(b, k)])[args.repeats // 2] for k in ("panels", "column-major"))
            print(f"| {name} | {b} | {p * 1e3:.3f} | {c * 1e3:.3f} | {c / p:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
