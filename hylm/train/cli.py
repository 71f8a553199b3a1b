"""Command-line flags of `hylm train` / `python -m hylm.train` (one definition for both)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .config import TrainConfig

_D = TrainConfig()


def parse_mix(text: str | None) -> dict[str, float] | None:
    """`needle_single=2,arith_think=1` or a JSON object -> {task: weight}."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            mix = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--mix: not valid JSON ({e.msg})") from None
    else:
        mix = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, weight = part.partition("=")
            if not sep:
                raise ValueError(f"--mix: expected TASK=WEIGHT, got {part!r}")
            try:
                mix[name.strip()] = float(weight)
            except ValueError:
                raise ValueError(f"--mix: weight of {name!r} is not a number") from None
    from .curriculum import check_mix

    return check_mix(mix)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=_D.model, metavar="CONFIG",
                   help="model config: a config.json, a model directory or a preset "
                        f"(micro, hylm-tiny, or an hylm preset; default {_D.model})")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (model, checkpoints, logs)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="directory with tokenizer.json (default: reuse the one in --out / the checkpoint, "
                        "else train a BPE on the curriculum into --out)")
    p.add_argument("--tokenizer-corpus", type=int, default=_D.tokenizer_corpus, metavar="N",
                   help=f"examples rendered to train the tokenizer (default {_D.tokenizer_corpus})")
    p.add_argument("--init-from", metavar="DIR", help="start from this checkpoint's weights (fresh optimizer)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (weights, optimizer, data position)")
    p.add_argument("--steps", type=int, default=_D.steps, help=f"total optimizer steps (default {_D.steps})")
    p.add_argument("--batch-tokens", type=int, default=_D.batch_tokens,
                   help=f"tokens per step (default {_D.batch_tokens})")
    p.add_argument("--seq-len", type=int, default=_D.seq_len, help=f"longest example (default {_D.seq_len})")
    p.add_argument("--lr", type=float, default=_D.lr, help=f"peak learning rate (default {_D.lr})")
    p.add_argument("--min-lr", type=float, default=_D.min_lr, help=f"final learning rate (default {_D.min_lr})")
    p.add_argument("--warmup", type=int, default=_D.warmup, help=f"warmup steps (default {_D.warmup})")
    p.add_argument("--weight-decay", type=float, default=_D.weight_decay)
    p.add_argument("--beta1", type=float, default=_D.beta1)
    p.add_argument("--beta2", type=float, default=_D.beta2)
    p.add_argument("--grad-clip", type=float, default=_D.grad_clip, help="max global grad norm (0: off)")
    p.add_argument("--mtp-weight", type=float, default=_D.mtp_weight,
                   help=f"weight of the MTP loss (token after next; default {_D.mtp_weight})")
    p.add_argument("--mtp-depth", type=int, default=_D.mtp_depth,
                   help="MTP levels trained with shared weights: draft 1..D of speculative decoding "
                        f"(default {_D.mtp_depth})")
    p.add_argument("--mtp-only", action="store_true",
                   help="train the MTP block alone (e.g. deeper, with --init-from): every other weight, router "
                        "biases included, stays bit for bit, so the model's own outputs do not change")
    p.add_argument("--router-bias-rate", type=float, default=_D.router_bias_rate,
                   help="aux-loss-free MoE balancing step per update (0: off)")
    p.add_argument("--seed", type=int, default=_D.seed, help="weight initialisation seed")
    p.add_argument("--data-seed", type=int, default=_D.data_seed, help="first curriculum example seed")
    p.add_argument("--mix", help="task weights: TASK=W,TASK=W or a JSON object (default: curriculum.DEFAULT_MIX)")
    p.add_argument("--task-opts", help="per-task generator options as JSON, e.g. "
                                       "'{\"needle_single\": {\"filler_range\": [20, 60]}}'")
    p.add_argument("--device", default=_D.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=_D.dtype,
                   help="fp32, or bf16 autocast with fp32 master weights (for GPUs)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--log-interval", type=int, default=_D.log_interval)
    p.add_argument("--eval-interval", type=int, default=_D.eval_interval, help="held-out loss every N steps")
    p.add_argument("--save-interval", type=int, default=_D.save_interval, help="checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=_D.keep_checkpoints)
    p.add_argument("--pad-multiple", type=int, default=_D.pad_multiple,
                   help="pad sequences to a multiple of this (fewer distinct lengths, faster on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="no loss curve PNG")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    task_opts: Any = None
    if args.task_opts:
        try:
            task_opts = json.loads(args.task_opts)
        except json.JSONDecodeError as e:
            raise ValueError(f"--task-opts: not valid JSON ({e.msg})") from None
    return TrainConfig(
        model=args.config, out_dir=args.out, tokenizer=args.tokenizer, tokenizer_corpus=args.tokenizer_corpus,
        init_from=args.init_from, resume=args.resume, steps=args.steps, batch_tokens=args.batch_tokens,
        seq_len=args.seq_len, lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, weight_decay=args.weight_decay,
        beta1=args.beta1, beta2=args.beta2, grad_clip=args.grad_clip, mtp_weight=args.mtp_weight, mtp_depth=args.mtp_depth,
        mtp_only=args.mtp_only, router_bias_rate=args.router_bias_rate, seed=args.seed, data_seed=args.data_seed,
        mix=parse_mix(args.mix), task_opts=task_opts, device=args.device, dtype=args.dtype, threads=args.threads,
        log_interval=args.log_interval, eval_interval=args.eval_interval, save_interval=args.save_interval,
        keep_checkpoints=args.keep_checkpoints, pad_multiple=args.pad_multiple, progress=not args.no_progress,
        plot=not args.no_plot)


def run(args: argparse.Namespace) -> int:
    from .trainer import train

    summary = train(config_from_args(args))
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hylm.train",
                                description="Train a nemotron_h model on hylm's synthetic curriculum.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        print(f"hylm train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hylm train: interrupted", file=sys.stderr)
        return 130
