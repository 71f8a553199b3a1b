"""Command-line flags of `hylm eval-tasks` / `python -m hylm.eval`."""

from __future__ import annotations

import argparse
import json
import sys


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.curriculum import EVAL_SEED_BASE

    p.add_argument("model", metavar="MODEL_DIR", help="a trained model directory (weights + tokenizer)")
    p.add_argument("--n", type=int, default=50, help="examples per task (default 50)")
    p.add_argument("--seed-base", type=int, default=EVAL_SEED_BASE,
                   help=f"first held-out seed (default {EVAL_SEED_BASE}; training uses seeds < 10**6)")
    p.add_argument("--tasks", help="comma-separated rows (default: all; tool_call_answer is the turn after "
                                   "the tool response)")
    p.add_argument("--needle-lengths", "--retrieval-at-lengths", dest="needle_lengths", metavar="MULTIPLES",
                   help="also run the needle tasks at these multiples of the training length, e.g. 1,2,4")
    p.add_argument("--train-len", type=int, help="training length in tokens (default: from the model "
                                                 "directory's train_summary.json, else 512)")
    p.add_argument("--max-tokens", type=int, help="generation budget (default: twice the reference answer + 16)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="sequences decoded together")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print {task: accuracy} as JSON")
    p.add_argument("--details", metavar="FILE", help="write accuracies, counts and sample failures as JSON")


def run(args: argparse.Namespace) -> int:
    from .tasks import evaluate, format_table

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.n < 1:
        raise ValueError("--n must be >= 1")
    rows = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    multiples = _floats(args.needle_lengths) if args.needle_lengths else []
    report = evaluate(args.model, rows=rows, n=args.n, seed_base=args.seed_base, retrieval_at_lengths=multiples,
                      train_len=args.train_len, max_tokens=args.max_tokens, max_num_seqs=args.max_num_seqs,
                      dtype=args.dtype, device=args.device)
    if args.details:
        with open(args.details, "w", encoding="utf-8") as f:
            json.dump(report.to_json(), f, indent=2)
    if args.json:
        print(json.dumps(report.accuracy, indent=2))
    else:
        print(format_table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hylm.eval", description="Accuracy per curriculum task.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        print(f"hylm eval-tasks: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
