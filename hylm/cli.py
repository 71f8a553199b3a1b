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


# ---- entry point -----------------------------------------------------------------------------------------

# Each entry adds one subcommand; a new subcommand is one `_add_<name>` + `cmd_<name>` pair listed here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_inspect]


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
    except (CLIError, ConfigError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__  # always one line
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
