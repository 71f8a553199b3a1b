"""The `hylm` command line.

Each subcommand is a pair of functions: `_add_<name>(subparsers)` declares its arguments and
`cmd_<name>(args) -> int` runs it. Heavy imports (torch, the model) happen inside `cmd_<name>` so that
`hylm --help` stays fast. A user error (bad model path, unknown preset, invalid config) raises
`CLIError`, `ConfigError` or `OSError`; `main` prints it as one line `hylm: error: <message>` on stderr and
exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

PROG = "hylm"
DTYPE_CHOICES = ("bf16", "fp16", "fp32")


class CLIError(Exception):
    """A user error: printed as `hylm: error: <message>`, exit status 2."""


# ---- helpers shared by subcommands --------------------------------------------------------------------

def resolve_config(model: str):
    """A preset name, a model directory holding config.json, or a config.json file -> ModelConfig."""
    from .config import PRESETS, ConfigError, ModelConfig, preset

    path = None
    if os.path.isdir(model):
        path = os.path.join(model, "config.json")
        if not os.path.isfile(path):
            raise CLIError(f"{model}: no config.json in this directory")
    elif os.path.isfile(model):
        path = model
    if path is not None:
        try:
            return ModelConfig.from_json(path)
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:  # a value of the wrong type that validation did not catch
            raise CLIError(f"{path}: invalid config ({e})") from None
    if model in PRESETS:
        return preset(model)
    raise CLIError(f"{model}: neither a model directory nor a preset (presets: {', '.join(sorted(PRESETS))})")


def _count(n: int) -> str:
    """A parameter count: 120668687360 -> '120.669 B (120668687360)'."""
    if n >= 10**9:
        return f"{n / 1e9:.3f} B ({n})"
    if n >= 10**6:
        return f"{n / 1e6:.3f} M ({n})"
    return str(n)


def _bytes(n: int) -> str:
    """Bytes in binary units: 8192 -> '8.00 KiB (8192 B)'."""
    value, unit = float(n), "B"
    for next_unit in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, next_unit
    return f"{n} B" if unit == "B" else f"{value:.2f} {unit} ({n} B)"


# ---- hylm inspect ---------------------------------------------------------------------------------------

def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a model's layers, parameter counts and memory sizes",
                       description="Show a model's layers, parameter counts (total and active per token), "
                                   "KV-cache and SSM-state sizes and weight bytes. Nothing is allocated.")
    p.add_argument("model", metavar="MODEL_DIR_OR_PRESET",
                   help="a directory with config.json (or the config.json itself), or a preset name")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16",
                   help="dtype of the weights, KV cache and conv window (default bf16; SSM state is fp32)")
    p.set_defaults(func=cmd_inspect)


def format_stats(stats: dict) -> str:
    c = stats["config"]
    dt = stats["dtype"]
    rows: list[tuple[str, str]] = []

    def section(title: str) -> None:
        rows.append((title, ""))

    def row(name: str, value: str) -> None:
        rows.append(("  " + name, value))

    section("layers")
    for kind, n in stats["layers"].items():
        if n:
            row(kind, str(n))
    row("total", str(c["num_hidden_layers"]))
    if stats["mtp_params"]:
        row("MTP", c["mtp_pattern"])
    section("parameters")
    for kind, n in stats["params_by_kind"].items():
        if n:
            row(kind, _count(n))
    row("total (without MTP)", _count(stats["total_params"]))
    row("active per token", _count(stats["active_params"]))
    if stats["mtp_params"]:
        row("MTP", _count(stats["mtp_params"]))
    section(f"memory ({dt})")
    row("KV cache per token", _bytes(stats["kv_cache_bytes_per_token"]))
    row("KV cache at 1M tokens", _bytes(stats["kv_cache_bytes_1m_tokens"]))
    row("SSM + conv state per sequence", _bytes(stats["ssm_state_bytes_per_sequence"]))
    for name, n in stats["weight_bytes"].items():
        row(f"weights in {name}", _bytes(n))
    row("weights total (without MTP)", _bytes(stats["weight_bytes_total"]))
    if stats["mtp_weight_bytes"]:
        row("MTP weights", _bytes(stats["mtp_weight_bytes"]))

    moe = f"{c['n_routed_experts']} experts, top {c['num_experts_per_tok']}"
    if c["moe_latent_size"]:
        moe += f", latent {c['moe_latent_size']}"
    header = [
        f"hidden {c['hidden_size']}, vocab {c['vocab_size']}, {c['num_hidden_layers']} layers",
        f"pattern {c['pattern']}",
        f"attention {c['num_attention_heads']}/{c['num_key_value_heads']} heads x {c['head_dim']}; "
        f"mamba {c['mamba_num_heads']} heads x {c['mamba_head_dim']}, state {c['ssm_state_size']}, "
        f"{c['n_groups']} groups; moe {moe}",
    ]
    width = max(len(name) for name, _ in rows) + 2
    body = [f"{name:<{width}}{value}".rstrip() for name, value in rows]
    return "\n".join(header + [""] + body)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .stats import model_stats

    config = resolve_config(args.model)
    stats = model_stats(config, dtype=args.dtype)
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(format_stats(stats))
    return 0


# ---- hylm generate --------------------------------------------------------------------------------------

def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion for a prompt (offline, in-process)",
                       description="Generate text (or token ids) for a prompt with the in-process engine.")
    p.add_argument("model", metavar="MODEL_DIR_OR_PRESET")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer.json)")
    src.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,523,77")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-stream", action="store_true", help="print the whole result at the end")
    p.set_defaults(func=cmd_generate)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise CLIError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine.llm import LLM
    from .engine.sampling_params import SamplingParams

    resolve_config(args.model)  # a clear error for a bad model before anything loads
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
                            ignore_eos=args.ignore_eos)
    max_len = args.max_model_len
    prompt = args.prompt if args.prompt is not None else _parse_ids(args.prompt_ids)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=1, max_model_len=max_len)
    if isinstance(prompt, str) and llm.tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer.json: pass --prompt-ids instead of --prompt")
    text_mode = llm.tokenizer is not None
    if args.no_stream:
        out = llm.generate(prompt, params)[0].outputs[0]
        print(out.text if text_mode else " ".join(map(str, out.token_ids)))
        print(f"[finish_reason: {out.finish_reason}]", file=sys.stderr)
        return 0
    for ev in llm.stream(prompt, params):
        piece = ev.new_text if text_mode else " ".join(map(str, ev.new_token_ids)) + " "
        print(piece or "", end="", flush=True)
        if ev.finished:
            print(f"\n[finish_reason: {ev.finish_reason}]", file=sys.stderr)
    return 0


# ---- hylm chat ------------------------------------------------------------------------------------------

DIM, RESET = "\033[2m", "\033[0m"


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat in the terminal (reasoning shown dimmed)",
                       description="Chat with a model in the terminal. Commands: /think and /nothink toggle "
                                   "reasoning, /reset clears the conversation, /exit quits.")
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--reasoning-budget", type=int, default=None, help="maximum reasoning tokens per answer")
    p.add_argument("--no-think", action="store_true", help="start with reasoning off")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32")
    p.add_argument("--max-model-len", type=int, default=None)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat.chat_format import ChatFormat
    from .engine.llm import LLM
    from .engine.sampling_params import SamplingParams

    resolve_config(args.model)
    if not os.path.isfile(os.path.join(args.model, "tokenizer.json")):
        raise CLIError(f"{args.model} has no tokenizer.json: chat needs a tokenizer")
    if args.reasoning_budget is not None and args.reasoning_budget < 0:
        raise CLIError("--reasoning-budget must be >= 0")
    fmt = ChatFormat.from_dir(args.model)
    llm = LLM(args.model, tokenizer=fmt.tokenizer, dtype=args.dtype, max_num_seqs=1, max_model_len=args.max_model_len)
    color = sys.stdout.isatty()
    thinking = not args.no_think
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"hylm chat: {args.model} (thinking {'on' if thinking else 'off'}; /think, /nothink, /reset, /exit)")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        cmd = line.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd in ("/think", "/nothink"):
            thinking = cmd == "/think"
            print(f"[thinking {'on' if thinking else 'off'}]")
            continue
        if cmd == "/reset":
            history = history[:1] if args.system else []
            print("[conversation cleared]")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        prompt = fmt.prompt(history, enable_thinking=thinking)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed, thinking_budget=fmt.thinking_budget(prompt, args.reasoning_budget))
        stream = fmt.stream(prompt)
        in_reasoning = False
        try:
            for ev in llm.stream(prompt.ids, params):
                delta = stream.add(ev.new_token_ids)
                if ev.finished:
                    tail = stream.finish()
                    delta.reasoning += tail.reasoning
                    delta.content += tail.content
                if delta.reasoning:
                    if not in_reasoning and color:
                        print(DIM, end="")
                    in_reasoning = True
                    print(delta.reasoning, end="", flush=True)
                if delta.content:
                    if in_reasoning:
                        print(RESET if color else "", end="\n\n" if not color else "\n")
                        in_reasoning = False
                    print(delta.content, end="", flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        if in_reasoning and color:
            print(RESET, end="")
        print()
        res = stream.result()
        history.append({"role": "assistant", "content": res.content or "", "reasoning_content": res.reasoning})


# ---- entry point -----------------------------------------------------------------------------------------

# Each entry adds one subcommand; a new subcommand is one `_add_<name>` + `cmd_<name>` pair listed here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_inspect, _add_generate, _add_chat]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Inference engine for hybrid Mamba-2 + (Latent)MoE "
                                     "+ attention models (NVIDIA Nemotron-H / Nemotron 3).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (CLIError, ConfigError, OSError, ValueError) as e:
        message = " ".join(str(e).split()) or type(e).__name__  # always one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
