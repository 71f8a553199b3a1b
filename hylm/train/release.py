"""Turn a finished training run into a shippable model directory with a model card.

`python -m hylm.train.release RUN_DIR OUT_DIR` copies the final weights, config, tokenizer and chat template
of `hylm train --out RUN_DIR`, scores the model on held-out curriculum seeds (`hylm eval-tasks`, plus needle
retrieval at multiples of the training length) and writes `eval_results.json` and a model card
(`README.md`) stating the recipe, the command that reproduces it, its runtime and its scores.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .config import TrainConfig

MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "train_summary.json",
               "tokenizer.json", "tokenizer_config.json", "loss_curve.png")
# the needle rows reported at the training length; the card's headline retrieval number is their mean
NEEDLE_ROWS = ("needle_single", "needle_multikey", "needle_multivalue")
_FLAG_NAMES = {"out_dir": "out", "tokenizer_corpus": "tokenizer-corpus", "model": "config"}


def train_command(train_config: dict[str, Any]) -> str:
    """The `hylm train` command line that reproduces a run: every setting that differs from the default."""
    default = TrainConfig()
    parts = ["hylm train"]
    skip = {"progress", "plot", "device", "dtype", "threads", "log_interval", "tokenizer", "resume", "init_from"}
    for key, value in train_config.items():
        if key in skip or value is None:
            continue
        if key == "model":
            if isinstance(value, dict):
                continue  # a full config dict: the card shows config.json; the preset name is in the recipe
            if value == default.model:
                continue
        elif getattr(default, key, object()) == value:
            continue
        flag = "--" + _FLAG_NAMES.get(key, key.replace("_", "-"))
        if isinstance(value, dict):
            value = "'" + json.dumps(value, separators=(",", ":")) + "'"
        parts.append(f"{flag} {value}")
    if train_config.get("threads"):
        parts.append(f"--threads {train_config['threads']}")
    return " ".join(parts)


def copy_model(run_dir: Path, out_dir: Path) -> list[str]:
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (run_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: no {', '.join(missing)} (is this a finished `hylm train` run?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in MODEL_FILES:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out_dir / name)
            copied.append(name)
    return copied


def _runtime_seconds(run_dir: Path, summary: dict[str, Any]) -> float | None:
    if summary.get("train_seconds"):
        return float(summary["train_seconds"])
    # runs from before the trainer kept its wall time: tokenizer written at the start, weights at the end
    start, end = run_dir / "tokenizer.json", run_dir / "model.safetensors"
    if start.is_file() and end.is_file():
        return max(0.0, end.stat().st_mtime - start.stat().st_mtime)
    return None


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def model_card(name: str, config: dict[str, Any], summary: dict[str, Any], results: dict[str, Any],
               runtime_s: float | None, params: dict[str, int], release_cmd: str) -> str:
    tc = summary.get("train_config", {})
    acc, counts = results["accuracy"], results["counts"]
    train_len = results["train_len"]
    needle_at_train = [acc[f"{r}@{train_len}"] for r in NEEDLE_ROWS if f"{r}@{train_len}" in acc]
    kind_chars = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "moe": "E",
                  "mlp": "-"}
    mtp_pattern = config.get("mtp_hybrid_override_pattern") or "".join(
        kind_chars.get(k, "?") for k in config.get("mtp_layers_block_type", []))
    lines = [
        f"# {name}",
        "",
        "A small Nemotron-3-shaped hybrid model (`nemotron_h`: Mamba-2, LatentMoE and a few NoPE attention layers, "
        "one MTP block) that hylm trains from scratch on its synthetic curriculum and ships so that every "
        "feature works out of the box: chat with reasoning on/off, tool calls, needle retrieval, MTP speculative "
        "decoding, quantization. It knows nothing but the curriculum (see `hylm/train/curriculum.py`).",
        "",
        "## Architecture",
        "",
        f"- pattern `{config.get('hybrid_override_pattern')}` + MTP `{mtp_pattern}`, "
        f"hidden {config['hidden_size']}, vocab {config['vocab_size']}",
        f"- {params['total']:,} parameters ({params['active']:,} active per token), MTP block {params['mtp']:,}",
        f"- Mamba-2: {config['mamba_num_heads']} heads x {config['mamba_head_dim']}, state {config['ssm_state_size']}, "
        f"{config['n_groups']} groups; attention: {config['num_attention_heads']} q / "
        f"{config['num_key_value_heads']} kv heads x {config['head_dim']}; MoE: {config['n_routed_experts']} experts, "
        f"top-{config['num_experts_per_tok']}, latent {config.get('moe_latent_size')}, shared expert",
        "- weights: fp32 safetensors with `backbone.` / `mtp.` names; transformers' `NemotronHForCausalLM` loads "
        "them (tests/test_bundled_model.py checks its logits against hylm's)",
        "",
        "## Recipe",
        "",
        f"- {summary.get('step')} AdamW steps of ~{tc.get('batch_tokens')} tokens (packed, per-sequence state "
        f"resets), {summary.get('tokens_seen', 0):,} tokens in all; sequences up to {tc.get('seq_len')} tokens",
        f"- peak lr {tc.get('lr')} after {tc.get('warmup')} warmup steps, cosine to {tc.get('min_lr')}; weight decay "
        f"{tc.get('weight_decay')}; grad clip {tc.get('grad_clip')}; MTP loss weight {tc.get('mtp_weight')}",
        f"- final training loss {summary.get('final_loss', float('nan')):.4f}",
        "- runtime: " + (f"{runtime_s / 60:.0f} minutes" if runtime_s else "unknown")
        + f" on {results['hardware']}",
        "",
        "Reproduce (then `" + release_cmd + "` writes this directory and card):",
        "",
        "```",
        train_command(tc),
        "```",
        "",
        "## Scores",
        "",
        f"Greedy decoding on held-out seeds (>= 10^9; training used seeds < 10^6), {results['n']} examples per "
        f"task, `hylm eval-tasks`. Training length: {train_len} tokens.",
        "",
        "| task | accuracy | correct / total |",
        "|---|---|---|",
    ]
    for row, a in acc.items():
        ok, total = counts[row]
        lines.append(f"| {row} | {_pct(a)} | {ok} / {total} |")
    lines += [""]
    if needle_at_train:
        lines.append(f"Needle retrieval at the training length ({train_len} tokens): "
                     f"{_pct(sum(needle_at_train) / len(needle_at_train))} (mean of single / multikey / multivalue).")
    longer = sorted({int(r.split("@")[1]) for r in acc if "@" in r} - {train_len})
    for length in longer:
        vals = [acc[f"{r}@{length}"] for r in NEEDLE_ROWS if f"{r}@{length}" in acc]
        lines.append(f"- at {length} tokens ({length / train_len:g}x): {_pct(sum(vals) / len(vals))}")
    lines += ["", "Thinking-off rows (`arith_direct`, needles, list tasks, half of the tool rows) fail any output that "
              "contains a reasoning trace.", ""]
    return "\n".join(lines)


def release(run_dir: str | Path, out_dir: str | Path, n: int = 100, multiples: tuple[float, ...] = (1, 2, 4, 8, 16),
            train_len: int | None = None, max_num_seqs: int = 16, log=print) -> dict[str, Any]:
    from ..config import ModelConfig
    from ..eval.tasks import evaluate, format_table, train_length
    from ..stats import model_stats

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    copied = copy_model(run_dir, out_dir)
    log(f"copied {', '.join(copied)} to {out_dir}")
    summary = json.loads((run_dir / "train_summary.json").read_text()) if (run_dir / "train_summary.json").is_file() \
        else {}
    tl = train_len or train_length(out_dir)
    t0 = time.perf_counter()
    report = evaluate(out_dir, n=n, retrieval_at_lengths=multiples, train_len=tl, max_num_seqs=max_num_seqs)
    log(format_table(report))
    log(f"evaluated in {time.perf_counter() - t0:.0f} s")
    results = {**report.to_json(), "n": n, "train_len": tl,
               "hardware": f"{platform.machine()} CPU, {__import__('os').cpu_count()} cores"}
    (out_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    config = json.loads((out_dir / "config.json").read_text())
    stats = model_stats(ModelConfig.from_hf_dict(config), "float32")
    params = {"total": stats["total_params"], "active": stats["active_params"], "mtp": stats["mtp_params"]}
    cmd = f"python -m hylm.train.release {run_dir} {out_dir} --n {n}"
    card = model_card(out_dir.name, config, summary, results, _runtime_seconds(run_dir, summary), params, cmd)
    (out_dir / "README.md").write_text(card)
    return results


GOLDEN_ROWS = ("arith_think", "arith_direct", "arith_low_effort", "tool_call", "tool_call_answer", "needle_single",
               "needle_multikey", "sort", "reverse")


def record_golden(model_dir: str | Path, path: str | Path, seeds_per_row: int = 20) -> list[dict[str, Any]]:
    """Golden greedy outputs for tests/test_bundled_model.py: per row, the first held-out seed the model gets
    right (the accuracy itself is measured by `evaluate`; these pin the exact tokens against regressions)."""
    from ..chat import ChatTemplate, Tokenizer
    from ..engine.llm import LLM
    from ..engine.sampling_params import SamplingParams
    from ..eval.tasks import build_items, score_output
    from .curriculum import EVAL_SEED_BASE

    tokenizer, template = Tokenizer.from_dir(model_dir), ChatTemplate.from_dir(model_dir)
    llm = LLM(str(model_dir), max_num_seqs=4, max_model_len=1024)
    stop = sorted(set(tokenizer.eos_token_ids))
    cases = []
    for row in GOLDEN_ROWS:
        for seed in range(EVAL_SEED_BASE, EVAL_SEED_BASE + seeds_per_row):
            item = build_items(template, tokenizer, rows=[row], n=1, seed_base=seed)[0]
            params = SamplingParams(temperature=0.0, max_tokens=item.max_tokens, stop_token_ids=stop)
            ids = llm.generate([item.prompt_ids], params)[0].outputs[0].token_ids
            if score_output(item.example, tokenizer.decode(ids, skip_special_tokens=False), item.turn).ok:
                cases.append({"row": row, "seed": seed, "prompt_ids": item.prompt_ids, "token_ids": ids})
                break
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(cases, indent=1) + "\n")
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hylm.train.release",
                                description="Copy a finished training run into a model directory, score it and "
                                            "write its model card.")
    p.add_argument("run_dir", help="the --out directory of a finished `hylm train` run")
    p.add_argument("out_dir", help="the model directory to write (e.g. models/hylm-tiny)")
    p.add_argument("--n", type=int, default=100, help="held-out examples per task (default 100)")
    p.add_argument("--lengths", default="1,2,4,8,16", help="needle retrieval at these multiples of the training "
                                                          "length (default 1,2,4,8,16)")
    p.add_argument("--train-len", type=int, help="training length in tokens (default: the run's seq_len)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--golden", metavar="FILE", help="also record golden greedy outputs (tests/golden/hylm_tiny.json)")
    p.add_argument("--golden-only", action="store_true", help="only record the golden outputs of OUT_DIR")
    args = p.parse_args(argv)
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        multiples = tuple(float(x) for x in args.lengths.split(",") if x.strip())
        if not args.golden_only:
            release(args.run_dir, args.out_dir, n=args.n, multiples=multiples, train_len=args.train_len)
        if args.golden:
            cases = record_golden(args.out_dir, args.golden)
            print(f"recorded {len(cases)} golden outputs ({', '.join(c['row'] for c in cases)}) to {args.golden}")
    except (OSError, ValueError) as e:
        print(f"hylm release: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
