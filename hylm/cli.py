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
    """A preset name, a model directory holding config.json, a config.json file, or a GGUF file (or a
    directory holding one instead of safetensors) -> ModelConfig."""
    from .config import PRESETS, ConfigError, ModelConfig, preset
    from .weights.gguf_loader import find_gguf, read_gguf_config

    gguf_file = find_gguf(model)
    if gguf_file is not None:
        return read_gguf_config(gguf_file)
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


def _add_parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism (torch.distributed: gloo on CPU, NCCL on CUDA)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split every layer over N ranks: under torchrun, its N processes (one or more machines); "
                        "otherwise this process spawns N - 1 more on this machine (default 1)")
    g.add_argument("--expert-parallel", action="store_true",
                   help="give each tensor-parallel rank a slice of whole routed experts instead of a slice of "
                        "every expert")
    g.add_argument("--expert-parallel-size", type=int, default=None, metavar="N",
                   help="expert parallelism over N ranks without tensor parallelism: each rank holds every "
                        "other layer whole and 1/N of the routed experts")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (cuda when a GPU is available, else cpu, with a notice), cpu, or cuda (one GPU per "
                        "rank, its local rank)")


def _resolve_device(args: argparse.Namespace) -> None:
    """--device auto -> cuda or cpu; cuda without a GPU is an error. Falling back to the CPU leaves a one-line
    notice for `_device_for`, so that a command that fails on its arguments still prints one line only."""
    device = getattr(args, "device", None)
    if device not in ("auto", "cuda"):
        return
    import torch

    if torch.cuda.is_available():
        args.device = "cuda"
    elif device == "cuda":
        raise CLIError("--device cuda: no CUDA GPU is available (use --device cpu)")
    else:
        args.device = "cpu"
        args.device_notice = f"{PROG}: no CUDA GPU found: running the CPU paths (fp32 compute)"


def _device_for(args: argparse.Namespace) -> str:
    """The device to load the model on; prints the CPU-fallback notice the first time."""
    notice = getattr(args, "device_notice", None)
    if notice:
        print(notice, file=sys.stderr)
        args.device_notice = None
    return args.device


def _parallel_sizes(args: argparse.Namespace) -> tuple[int, int] | None:
    """(tensor parallel size, expert parallel size), or None for one process."""
    tp = args.tensor_parallel_size
    ep = args.expert_parallel_size if args.expert_parallel_size is not None else (tp if args.expert_parallel else 1)
    if tp < 1 or ep < 1:
        raise CLIError("--tensor-parallel-size and --expert-parallel-size must be >= 1")
    if tp > 1 and ep > 1 and tp != ep:
        raise CLIError("expert parallelism spans the tensor-parallel ranks: use --expert-parallel "
                       "(or --expert-parallel-size equal to --tensor-parallel-size)")
    if max(tp, ep) == 1:
        return None
    if args.speculative_tokens:
        raise CLIError("--speculative-tokens is not supported with tensor or expert parallelism")
    if getattr(args, "kv_cache_dtype", "auto") != "auto":
        raise CLIError("--kv-cache-dtype is not supported with tensor or expert parallelism")
    return tp, ep


def _add_speculative(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative-tokens", type=int, default=0,
                   help="draft this many tokens per step with the model's MTP block (0: off); with "
                        "--speculative-min-confidence, at most this many")
    p.add_argument("--speculative-min-confidence", type=float, default=0.0, metavar="P",
                   help="stop drafting at the first draft (after the first) to which the MTP gives a probability "
                        "below P, for every request of the step (e.g. 0.9 with --speculative-tokens 5; default 0: "
                        "always --speculative-tokens drafts)")


def _add_kv_cache_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="dtype of the attention layers' KV cache (auto: the model's; bf16/fp16 halve an fp32 "
                        "model's KV memory at long context, compute stays in the model's dtype)")


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
    src.add_argument("--prompt-file", help="read the prompt text from this file ('-': stdin), for prompts "
                                           "longer than a command-line argument may be")
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
    _add_kv_cache_dtype(p)
    p.add_argument("--no-stream", action="store_true", help="print the whole result at the end")
    _add_speculative(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar of prefilled prompt tokens on stderr for prompts longer than one "
                        "prefill chunk (default: when stderr is a terminal)")
    _add_parallel(p)
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
    if args.prompt_file is not None:
        prompt = _read_prompt_file(args.prompt_file)
    else:
        prompt = args.prompt if args.prompt is not None else _parse_ids(args.prompt_ids)
    sizes = _parallel_sizes(args)
    if sizes is None:
        llm = LLM(args.model, tokenizer=_gguf_tokenizer(args.model), dtype=args.dtype, device=_device_for(args),
                  max_num_seqs=1, max_model_len=max_len, speculative_tokens=args.speculative_tokens,
                  speculative_min_confidence=args.speculative_min_confidence, kv_cache_dtype=args.kv_cache_dtype)
        return _generate(llm, args, prompt, params)
    from .chat.tokenizer import Tokenizer
    from .parallel import launch

    model = launch.start(args.model, *sizes, dtype=args.dtype, device=_device_for(args))
    if model is None:  # a torchrun worker rank: it served rank 0's steps until rank 0 closed
        return 0
    try:
        tokenizer = Tokenizer.from_dir(args.model) if os.path.isfile(os.path.join(args.model, "tokenizer.json")) \
            else None
        return _generate(LLM(model, tokenizer=tokenizer, max_num_seqs=1, max_model_len=max_len), args, prompt, params)
    finally:
        model.close()


def _gguf_tokenizer(model: str):
    """The BPE vocabulary a .gguf file carries, as a Tokenizer (None for anything else: a model directory's
    tokenizer.json is found by the engine itself)."""
    if not (os.path.isfile(model) and model.lower().endswith(".gguf")):
        return None
    from .weights.gguf_tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(model)


def _generate(llm, args: argparse.Namespace, prompt, params) -> int:
    if isinstance(prompt, str) and llm.tokenizer is None:
        raise CLIError(f"{args.model} has no tokenizer (tokenizer.json, or a GGUF BPE vocabulary): pass --prompt-ids "
                       "instead of --prompt")
    text_mode = llm.tokenizer is not None
    progress = _PrefillBar(llm.engine.config.max_num_batched_tokens, args.progress)
    try:
        if args.no_stream:
            out = llm.generate(prompt, params, on_prefill=progress)[0].outputs[0]
            progress.close()
            print(out.text if text_mode else " ".join(map(str, out.token_ids)))
            print(f"[finish_reason: {out.finish_reason}]", file=sys.stderr)
            return 0
        for ev in llm.stream(prompt, params, on_prefill=progress):
            progress.close()  # the prompt is in: output follows
            piece = ev.new_text if text_mode else " ".join(map(str, ev.new_token_ids)) + " "
            print(piece or "", end="", flush=True)
            if ev.finished:
                print(f"\n[finish_reason: {ev.finish_reason}]", file=sys.stderr)
    finally:
        progress.close()
    return 0


def _read_prompt_file(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--prompt-file: cannot read {path}: {e}") from None


class _PrefillBar:
    """on_prefill hook for `LLM.stream`: a tqdm bar of prefilled prompt tokens, opened at the first report
    for a prompt longer than one prefill chunk (a shorter one is done in one step: nothing to watch)."""

    def __init__(self, chunk: int, enabled: bool | None):
        self.chunk, self.enabled, self.bar = chunk, enabled, None

    def __call__(self, prompt_index: int, done: int, total: int) -> None:
        if self.enabled is False or total <= self.chunk:
            return
        if self.bar is None:
            from tqdm import tqdm

            # disable=None: tqdm shows the bar only on a terminal; --progress forces it
            self.bar = tqdm(total=total, desc="prefill", unit="tok", unit_scale=True, file=sys.stderr,
                            disable=None if self.enabled is None else False, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.enabled = False  # one prompt: once its output starts, no bar is opened again


def bundled_model_or(model: str | None, command: str) -> str:
    """The model a command was given, else the bundled one (models/hylm-tiny)."""
    from .server import DEFAULT_MODEL_DIR

    if model is not None:
        return model
    if not DEFAULT_MODEL_DIR.is_dir():
        raise CLIError(f"a model is required: hylm {command} MODEL_DIR (the bundled model {DEFAULT_MODEL_DIR} is "
                       "missing from this installation)")
    return str(DEFAULT_MODEL_DIR)


# ---- hylm chat ------------------------------------------------------------------------------------------

DIM, RESET = "\033[2m", "\033[0m"


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat in the terminal (reasoning shown dimmed)",
                       description="Chat with a model in the terminal. Commands: /think and /nothink toggle "
                                   "reasoning, /reset clears the conversation, /exit quits.")
    p.add_argument("model", metavar="MODEL_DIR", nargs="?", default=None,
                   help="a checkpoint directory with tokenizer.json (default: the bundled model)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--reasoning-budget", type=int, default=None, help="maximum reasoning tokens per answer")
    p.add_argument("--no-think", action="store_true", help="start with reasoning off")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32")
    p.add_argument("--max-model-len", type=int, default=None)
    _add_kv_cache_dtype(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat.chat_format import ChatFormat
    from .engine.llm import LLM
    from .engine.sampling_params import SamplingParams

    args.model = bundled_model_or(args.model, "chat")
    resolve_config(args.model)
    if not os.path.isfile(os.path.join(args.model, "tokenizer.json")):
        raise CLIError(f"{args.model} has no tokenizer.json: chat needs a tokenizer")
    if args.reasoning_budget is not None and args.reasoning_budget < 0:
        raise CLIError("--reasoning-budget must be >= 0")
    fmt = ChatFormat.from_dir(args.model)
    llm = LLM(args.model, tokenizer=fmt.tokenizer, dtype=args.dtype, max_num_seqs=1, max_model_len=args.max_model_len,
              kv_cache_dtype=args.kv_cache_dtype)
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


# ---- hylm serve -----------------------------------------------------------------------------------------

def _add_serve(sub: argparse._SubParsersAction) -> None:
    from .server import DEFAULT_HOST, DEFAULT_PORT

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/models, "
                                   "/tokenize, /detokenize, /health, /metrics (Prometheus) and /docs. Without "
                                   "MODEL_DIR it serves the bundled model.")
    p.add_argument("model", metavar="MODEL_DIR", nargs="?", default=None,
                   help="a checkpoint directory with config.json, weights and tokenizer.json")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the API (default: the HYLM_API_KEY environment "
                        "variable, else no key)")
    p.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="the model name clients use (repeatable; default: the model directory's name)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="requests run at once, one state slot each (default 8)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="maximum prompt + output tokens (default: the model's maximum)")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="budget for sequence state and KV cache in GiB (default: enough for max-num-seqs x "
                        "max-model-len)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests that may wait for a slot; beyond it the server answers 503 (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request body accepted, else 413 (default 4 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGINT/SIGTERM, seconds in-flight requests get to finish before they are aborted "
                        "(default 30)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32")
    p.add_argument("--seed", type=int, default=0, help="seed for requests that give none")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn off prefix caching (on by default: chat turns resume from cached Mamba states)")
    p.add_argument("--prefix-cache-bytes", type=int, default=None,
                   help="memory for cached state checkpoints (default: 4 x max-num-seqs sequence states)")
    _add_speculative(p)
    _add_kv_cache_dtype(p)
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    _add_parallel(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    model = bundled_model_or(args.model, "serve")
    if not os.path.isdir(model):
        raise CLIError(f"{model}: not a model directory")
    resolve_config(model)  # a clear error for a bad model before anything loads
    if not os.path.isfile(os.path.join(model, "tokenizer.json")):
        raise CLIError(f"{model} has no tokenizer.json: the server needs the model's tokenizer")
    for name, value, low in (("--max-num-seqs", args.max_num_seqs, 1), ("--max-waiting", args.max_waiting, 0),
                             ("--max-body-bytes", args.max_body_bytes, 1), ("--port", args.port, 0)):
        if value < low:
            raise CLIError(f"{name} must be >= {low}")
    if args.port > 65535:
        raise CLIError("--port must be <= 65535")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise CLIError("--max-model-len must be >= 2")
    if args.memory_gib is not None and not args.memory_gib > 0:
        raise CLIError("--memory-gib must be > 0")
    if args.shutdown_timeout < 0:
        raise CLIError("--shutdown-timeout must be >= 0")

    sizes = _parallel_sizes(args)
    if sizes is not None:
        from .parallel import launch

        if launch.is_worker_rank():  # torchrun rank > 0: no HTTP, only rank 0's steps on this rank's shard
            launch.start(model, *sizes, dtype=args.dtype, device=_device_for(args), seed=args.seed)
            return 0
        if args.enable_prefix_caching:
            print("hylm serve: prefix caching is off with tensor/expert parallelism (the other ranks do not "
                  "keep state checkpoints yet)", file=sys.stderr)
            args.enable_prefix_caching = False

    from .engine.engine import EngineConfig, LLMEngine
    from .server.launch import bind, serve
    from .server.state import load_state

    bind(args.host, args.port).close()  # a taken port fails now, not after the model has loaded
    memory = int(args.memory_gib * 2**30) if args.memory_gib is not None else None
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, memory_bytes=memory,
                          enable_prefix_caching=args.enable_prefix_caching, prefix_cache_bytes=args.prefix_cache_bytes,
                          speculative_tokens=args.speculative_tokens,
                          speculative_min_confidence=args.speculative_min_confidence,
                          kv_cache_dtype=args.kv_cache_dtype)
    api_key = args.api_key if args.api_key is not None else (os.environ.get("HYLM_API_KEY") or None)
    parallel_model = engine = None
    if sizes is not None:
        parallel_model = launch.start(model, *sizes, dtype=args.dtype, device=_device_for(args), seed=args.seed)
        engine = LLMEngine(parallel_model, config, seed=args.seed)
    try:
        state = load_state(model, dtype=args.dtype, device=_device_for(args), engine_config=config, engine=engine,
                           served_model_names=args.served_model_name, max_waiting=args.max_waiting, api_key=api_key,
                           max_body_bytes=args.max_body_bytes, shutdown_timeout=args.shutdown_timeout,
                           seed=args.seed)
        return serve(state, args.host, args.port, log_level=args.log_level, access_log=not args.no_access_log,
                     shutdown_timeout=args.shutdown_timeout)
    finally:
        if parallel_model is not None:
            parallel_model.close()


# ---- hylm train ------------------------------------------------------------------------------------------

def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train.cli import add_arguments

    p = sub.add_parser("train", help="train a nemotron_h model on the synthetic curriculum",
                       description="Train any nemotron_h config from scratch (or continue from a checkpoint) on "
                                   "hylm's seeded synthetic curriculum: AdamW, warmup + cosine, clipping, "
                                   "packed sequences, joint MTP loss, checkpoints and resume.")
    add_arguments(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .train.cli import run

    return run(args)


# ---- hylm eval-tasks -------------------------------------------------------------------------------------

def _add_eval_tasks(sub: argparse._SubParsersAction) -> None:
    from .eval.cli import add_arguments

    p = sub.add_parser("eval-tasks", help="accuracy per curriculum task on held-out seeds",
                       description="Generate held-out curriculum examples per task, decode greedily with the "
                                   "engine and score them (table, or JSON with --json).")
    add_arguments(p)
    p.set_defaults(func=cmd_eval_tasks)


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    from .eval.cli import run

    return run(args)


# ---- hylm niah -------------------------------------------------------------------------------------------

def _add_niah(sub: argparse._SubParsersAction) -> None:
    from .eval.niah import add_arguments

    p = sub.add_parser("niah", help="needle-in-a-haystack grid (length x depth) against the engine or a server",
                       description="Hide needles (RULER variants) at depths of haystacks sized with the served "
                                   "tokenizer, ask for them greedily, score by string match. Results are cached "
                                   "in --out (a rerun resumes); prints a length x depth table and writes a "
                                   "heatmap PNG.")
    add_arguments(p)
    p.set_defaults(func=cmd_niah)


def cmd_niah(args: argparse.Namespace) -> int:
    from .eval.niah import run

    return run(args)


# ---- hylm quantize ---------------------------------------------------------------------------------------

def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model to NVFP4 / FP8 (NVIDIA ModelOpt checkpoint layout)",
                       description="Quantize a checkpoint (or a preset with random weights) and write a ModelOpt-"
                                   "layout checkpoint that hylm (and ModelOpt-aware engines) load. Formats: nvfp4 "
                                   "(as Nemotron 3 Nano's release: NVFP4 except lm_head, attention, the Mamba layer "
                                   "before each attention layer), fp8 (per-tensor FP8 except lm_head), mixed (as "
                                   "Super's: routed experts NVFP4; Mamba in/out_proj, shared experts, latent "
                                   "projections FP8; attention, router, conv1d, norms, embeddings, lm_head bf16). "
                                   "MTP always stays unquantized.")
    p.add_argument("model", metavar="MODEL_DIR_OR_PRESET")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--format", choices=("nvfp4", "fp8", "mixed"), default="nvfp4", help="policy (default nvfp4)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16",
                   help="dtype to load the model in and to store the unquantized remainder (default bf16)")
    p.add_argument("--calib-tokens", type=int, default=0,
                   help="run this many random tokens through the model to set activation scales (input_scale, "
                        "unused by the CPU path; default 0: input_scale 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration tokens and of preset weights")
    p.add_argument("--nvfp4-scales", choices=("amax", "search"), default="amax",
                   help="NVFP4 block scales: amax (ModelOpt's rule, the default) or search (per block, the nearby "
                        "E4M3 scale with the least squared error; same format, lower error)")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GB per safetensors shard (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    resolve_config(args.model)  # a clear error for a bad model before anything loads
    if os.path.isdir(args.model) and os.path.realpath(args.model) == os.path.realpath(args.out):
        raise CLIError("OUT_DIR must differ from the model directory")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"{args.out}: exists and is not a directory")
    if os.path.isdir(args.out) and not args.overwrite and any(
            f == "config.json" or f.endswith(".safetensors") for f in os.listdir(args.out)):
        raise CLIError(f"{args.out} already holds a checkpoint (pass --overwrite to replace it)")
    if args.calib_tokens < 0 or args.max_shard_size <= 0:
        raise CLIError("--calib-tokens must be >= 0 and --max-shard-size > 0")
    from .weights.quantize import quantize_checkpoint

    summary = quantize_checkpoint(args.model, args.out, fmt=args.format, dtype=args.dtype,
                                  calib_tokens=args.calib_tokens, seed=args.seed,
                                  max_shard_bytes=int(args.max_shard_size * 1e9), progress=not args.no_progress,
                                  nvfp4_scale_search=args.nvfp4_scales == "search")
    m = summary["modules"]
    print(f"wrote {args.out}: quant_algo {summary['quant_algo']}, {m['nvfp4']} NVFP4 / {m['fp8']} FP8 / "
          f"{m['dense']} unquantized linear modules (experts counted per expert), "
          f"{_bytes(summary['weight_bytes'])} of weights")
    return 0


# ---- hylm export-gguf ------------------------------------------------------------------------------------

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k")


def _add_export_gguf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-gguf", help="write a model as a GGUF file for llama.cpp (nemotron_h_moe / nemotron_h)",
                       description="Convert a checkpoint directory (hylm, Hugging Face or ModelOpt layout) or a GGUF "
                                   "file into a GGUF file laid out as llama.cpp's converter writes Nemotron-H: its "
                                   "hyper-parameters, tensor names and shapes, and the tokenizer (tokenizer.ggml.* BPE "
                                   "vocabulary, merges, special ids and chat template from the directory's "
                                   "tokenizer.json / tokenizer_config.json). Norms, ssm_a/ssm_d, conv weights, biases "
                                   "and the router stay f32 whatever --type; rows that do not fit a block type fall "
                                   "back to f16 (q8_0, q4_0) or q8_0 (k-quants). The MTP block is not exported.")
    p.add_argument("model", metavar="MODEL", help="a checkpoint directory (or a .gguf file)")
    p.add_argument("out", metavar="OUT.gguf")
    p.add_argument("--type", default="f16", metavar="TYPE",
                   help=f"storage type of the weight matrices: {', '.join(GGUF_TYPES)} (default f16)")
    p.add_argument("--tokenizer-pre", default=None, metavar="NAME",
                   help="llama.cpp pre-tokenizer name to write (default: recognised from tokenizer.json)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.gguf if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export_gguf)


def cmd_export_gguf(args: argparse.Namespace) -> int:
    qtype = args.type.lower()
    if qtype not in GGUF_TYPES:
        raise CLIError(f"--type: unknown GGUF type {args.type!r} (use one of {', '.join(GGUF_TYPES)})")
    if not os.path.exists(args.model):
        raise CLIError(f"{args.model}: no such model directory or file")
    resolve_config(args.model)  # a clear error for a bad model before anything loads
    if os.path.isdir(args.out):
        raise CLIError(f"{args.out}: is a directory (give the path of the .gguf file to write)")
    if os.path.exists(args.out) and not args.overwrite:
        raise CLIError(f"{args.out} already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise CLIError(f"{parent}: no such directory")
    if os.path.isfile(args.model) and os.path.realpath(args.model) == os.path.realpath(args.out):
        raise CLIError("OUT.gguf must differ from the model file")
    from .weights.gguf_export import export_gguf

    summary = export_gguf(args.model, args.out, qtype, tokenizer_pre=args.tokenizer_pre,
                          progress=not args.no_progress)
    for warning in summary["warnings"]:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    types = ", ".join(f"{n} {t}" for t, n in sorted(summary["tensors"].items()))
    tok = summary["tokenizer"]
    tok_text = (f"tokenizer {tok['model']} (pre {tok['pre']}, {tok['tokens']} tokens, {tok['merges']} merges)"
                if tok["model"] != "none" else "no tokenizer (token ids only)")
    print(f"wrote {args.out}: {summary['architecture']}, {sum(summary['tensors'].values())} tensors ({types}), "
          f"{_bytes(summary['bytes'])}; {tok_text}")
    return 0


# ---- entry point -----------------------------------------------------------------------------------------

# Each entry adds one subcommand; a new subcommand is one `_add_<name>` + `cmd_<name>` pair listed here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_inspect, _add_generate, _add_chat, _add_serve, _add_train, _add_eval_tasks, _add_niah, _add_quantize,
                                                                    _add_export_gguf]


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
        _resolve_device(args)
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
