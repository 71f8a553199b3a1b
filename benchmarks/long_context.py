"""Long context on the CPU: prefill throughput and peak memory up to 1M tokens, decode latency against context.

    python3 benchmarks/long_context.py --quick      # smoke run: prefill 4K-16K, decode 1K-16K (a few minutes)
    python3 benchmarks/long_context.py              # prefill 4K-256K, decode 1K-1M
    python3 benchmarks/long_context.py --full       # adds the 1M-token prefill (hours: the estimate is printed first)
    python3 benchmarks/long_context.py --models super --lengths 4K,1M --decode-lengths 1K,512K

Two models, fp32, one sequence, the engine's chunked prefill (`--chunk` tokens per step):
  tiny   the bundled model: the checkpoint in models/hylm-tiny if present, else the `hylm-tiny` training
         preset with random weights;
  super  shaped like Nemotron 3 Super at reduced width, random weights: 22 layers with Super's proportions
         (10 Mamba-2, 10 LatentMoE, 2 attention, i.e. Super's 40/40/8 over 88), Super's 2 KV heads,
         SSM state size 128 and 8 groups;
  super-wide  the same pattern at 3/8 of Super's width (hidden 1536, 12/2 attention heads x 128, 48 Mamba
         heads, 32 experts top-4 with latent 384): 1.2 GiB of active fp32 weights per decode token, so the
         short-context decode step is bandwidth-bound as Super's is (decode only is the useful run:
         `--models super-wide --no-prefill`).

Every measurement runs in a fresh subprocess, so each peak RSS (VmHWM) belongs to one length alone.

Prefill: tok/s and peak RSS at each length, beside
  - the compute roofline: (2 x active params per token + attention FLOPs, quadratic in the length) over
    the fp32 GEMM rate measured here;
  - the predicted RSS = weights + T x kv_cache_bytes_per_token + Mamba states + C. C is one constant per
    model (Python + torch runtime, one prefill chunk's activations, allocator slack), measured by a
    calibration run whose prompt is two chunks long; the % difference therefore shows whatever grows with
    T besides the attention layers' KV.
Decode: ms/token at each context, the slowdown against the shortest context, and the bandwidth roofline:
  bytes read per token (active weights + T x KV bytes per token + Mamba state read and written) over the
  read bandwidth measured here. The long context is synthesized by default: the request's KV blocks and
  Mamba states are filled with random values of the exact sizes and layout a real prefill leaves (one
  request, blocks in order), and decoding starts from there. The decode step does exactly the work it
  would after a real prefill (attention reads every cached position; nothing depends on the values), so
  its timing is exact; `--decode-state prefill` prefills for real instead (quadratic: short contexts only),
  and `--quick` checks both ways agree at its shortest context.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUPER_MINI = dict(
    vocab_size=8192, hidden_size=256, pattern="MEMEM*EMEMEMEMEM*EMEME", num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, mamba_num_heads=8, mamba_head_dim=64, ssm_state_size=128, n_groups=8,
    conv_kernel=4, chunk_size=128, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=160,
    moe_latent_size=64, moe_shared_expert_intermediate_size=320, routed_scaling_factor=5.0, intermediate_size=320,
    n_group=1, topk_group=1, norm_topk_prob=True, max_position_embeddings=1 << 20, bos_token_id=1, eos_token_id=2,
    pad_token_id=0, use_conv_bias=True,
)
# The same layer pattern at 3/8 of Super's width (hidden 1536 = 4096 x 3/8, Super's head sizes, 32 of its 512
# experts): 1.2 GiB of fp32 weights read per decode token, so that the short-context step is bound by memory
# bandwidth as Super's is, not by per-layer overhead, and the decode slowdown can be compared with the roofline's.
SUPER_WIDE = dict(SUPER_MINI, vocab_size=16384, hidden_size=1536, num_attention_heads=12, head_dim=128,
                  mamba_num_heads=48, moe_intermediate_size=1008, moe_latent_size=384,
                  moe_shared_expert_intermediate_size=2016, intermediate_size=2016)
MODELS = ("tiny", "super", "super-wide")
TINY_DIR = ROOT / "models" / "hylm-tiny"
BLOCK = 16
MB = 1 << 20


# ---- sizes and models ---------------------------------------------------------------------------------------

def parse_tokens(text: str) -> int:
    """'4K' -> 4096, '1M' -> 1048576, '3000' -> 3000."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}")
    return int(m.group(1)) << {"": 0, "k": 10, "K": 10, "m": 20, "M": 20}[m.group(2)]


def fmt_tokens(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10}K"
    return str(n)


def model_config(name: str):
    from hylm.config import ModelConfig
    from hylm.train.configs import train_preset

    if name == "tiny":
        return ModelConfig.from_json(TINY_DIR / "config.json") if (TINY_DIR / "config.json").is_file() \
            else train_preset("hylm-tiny")
    return ModelConfig(**(SUPER_WIDE if name == "super-wide" else SUPER_MINI))


def build_model(name: str):
    import hylm

    if name == "tiny" and (TINY_DIR / "config.json").is_file():
        return hylm.load_model(TINY_DIR), f"checkpoint {TINY_DIR.relative_to(ROOT)}"
    return hylm.load_model(model_config(name), seed=0), "random weights"


def memory_terms(config) -> dict:
    """Bytes of what the engine keeps per token and per sequence (fp32 engine: conv window in fp32)."""
    return dict(kv_per_token=config.kv_cache_bytes_per_token(4), states=config.ssm_state_bytes_per_sequence(4))


def weight_bytes(model) -> int:
    return sum(t.nbytes for t in model.parameters()) + sum(b.nbytes for b in model.buffers())


def active_weight_bytes(model) -> int:
    """Weight bytes one decode token reads: every matrix except the embedding table (one row is read),
    the MTP block (unused without speculation) and the routed experts a token doesn't pick."""
    c = model.config
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp.") or name == "model.embeddings.weight":
            continue
        n = p.numel()
        if ".experts." in name:
            n = n * c.num_experts_per_tok // c.n_routed_experts
        total += n * p.element_size()
    return total


def prefill_flops(config, active_bytes: int, length: int) -> float:
    """FLOPs of a prefill of `length` tokens: 2 per active weight per token (no lm_head: logits are taken
    for the last position only), an estimate of the chunked SSD scan, and causal attention (QK^T and PV:
    4 x heads x head_dim per query-key pair, length^2 / 2 pairs per attention layer)."""
    c = config
    linear = 2 * (active_bytes // 4 - c.vocab_size * c.hidden_size) * length
    ssd = c.pattern.count("M") * 2 * c.mamba_num_heads * (
        c.chunk_size * (c.ssm_state_size + c.mamba_head_dim) + 2 * c.mamba_head_dim * c.ssm_state_size) * length
    attn = c.pattern.count("*") * 4 * c.num_attention_heads * c.head_dim * length * length / 2
    return linear + ssd + attn


def predicted_rss(config, weights: int, length: int, constant: int) -> int:
    """Peak RSS of a prefill of `length` tokens if nothing grows with the length but the attention layers'
    KV: weights + length x KV bytes per token + one sequence's Mamba states + the measured constant."""
    m = memory_terms(config)
    return weights + length * m["kv_per_token"] + m["states"] + constant


def decode_bytes(config, active_bytes: int, context: int) -> int:
    """Bytes one decode token reads at this context: weights, every cached K and V, Mamba states (read and
    written back)."""
    m = memory_terms(config)
    return active_bytes + context * m["kv_per_token"] + 2 * m["states"]


# ---- machine ------------------------------------------------------------------------------------------------

def measure_bandwidth() -> float:
    """Read bandwidth in bytes/s: a sum over a 512 MiB buffer, far larger than the caches (best of 5)."""
    import torch

    x = torch.ones(512 * MB // 4)
    x.sum()
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def measure_copy_bandwidth() -> float:
    """Copy bandwidth in bytes/s (read + write counted) between two touched 256 MiB buffers (best of 5)."""
    import torch

    x, y = torch.ones(256 * MB // 4), torch.zeros(256 * MB // 4)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() * 4 / best


def measure_gemm() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best


def measure_attention(config, chunk: int) -> float:
    """FLOP/s of the engine's attention for one prefill chunk against a 16K-token window of earlier KV
    (what dominates a long prefill), through the model's own attention layer."""
    import torch

    from hylm.model.attention import Attention
    from hylm.model.cache import ContiguousCache
    from hylm.model.batch import Batch

    c = config.replace(pattern="*")
    layer = Attention(c, 0)
    cache = ContiguousCache(c, 1, initial_capacity=16384 + chunk)
    cache.kv_write(0, 0, 0, torch.randn(16384, c.num_key_value_heads, c.head_dim),
                   torch.randn(16384, c.num_key_value_heads, c.head_dim))
    x = torch.randn(chunk, c.hidden_size)
    batch = Batch([chunk], [16384], [0])
    with torch.inference_mode():
        layer(x, batch, cache)
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            layer(x, batch, cache)
            best = min(best, time.perf_counter() - t)
    flops = 4 * c.num_attention_heads * c.head_dim * chunk * (16384 + chunk / 2)
    return flops / best


# ---- children: one measurement per process --------------------------------------------------------------------

def rss_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def child(args) -> None:
    import torch

    from hylm.engine.engine import EngineConfig, LLMEngine
    from hylm.engine.request import Status
    from hylm.engine.sampling_params import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.torch_attention:
        import hylm.model.attention as attention

        attention.native_decode_enabled = False
    runtime = rss_status()["VmRSS"]  # Python + torch + hylm imported, nothing built
    model, source = build_model(args.model)
    cfg = model.config
    n = args.length
    tag = f"[{args.model} {args.child} {fmt_tokens(n)}]"
    extra = args.new_tokens + 2 if args.child == "decode" else 1
    eng = LLMEngine(model, EngineConfig(max_num_seqs=1, max_model_len=n + extra, block_size=BLOCK,
                                        max_num_batched_tokens=args.chunk))
    pool = eng.pool
    prompt = torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    result = dict(model=args.model, source=source, kind=args.child, length=n, runtime_rss=runtime,
                  weights=weight_bytes(model), kv_bytes=sum(t.nbytes for t in pool.k.values()) * 2,
                  state_bytes=eng.sizes.num_slots * eng.sizes.slot_bytes, threads=torch.get_num_threads())
    last = [time.perf_counter(), 0]

    def progress(done: int, total: int) -> None:  # a line every 10% or 30 s, whichever comes first
        now = time.perf_counter()
        if done == total or done - last[1] >= total / 10 or now - last[0] > 30:
            rate = done / (now - start)
            eta = (total - done) / rate if rate else 0.0
            print(f"  {tag} prefilled {done:,}/{total:,} tokens ({rate:,.0f} tok/s overall, "
                  f"rss {rss_status()['VmRSS'] / MB:,.0f} MiB, eta {eta / 60:.1f} min)", file=sys.stderr, flush=True)
            last[:] = [now, done]

    if args.child == "prefill":
        start = time.perf_counter()
        eng.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=1), on_prefill=progress)
        while eng.has_unfinished():
            eng.step()
        result["seconds"] = time.perf_counter() - start
    else:
        params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens + 2, ignore_eos=True)
        if args.decode_state == "prefill":
            start = time.perf_counter()
            rid = eng.add_request(prompt, params, on_prefill=progress)
            while eng.requests[rid].num_output == 0:
                eng.step()
        else:
            # the state a real prefill of n - 1 tokens leaves: the request holds a slot and its KV blocks
            # (handed out in order, as to a lone request), every cached position and every Mamba state
            # holds values; the last prompt token is then fed by an ordinary decode step
            rid = eng.add_request(prompt, params)
            req = eng.requests[rid]
            eng.scheduler.waiting.remove(req)
            req.slot = pool.allocate_slot()
            if not pool.reserve(req.slot, n):
                raise RuntimeError("the pool has no room for the context")
            blocks = pool.block_tables[req.slot]
            if blocks != list(range(blocks[0], blocks[0] + len(blocks))):
                raise RuntimeError("expected the blocks of a lone request to be consecutive")
            g = torch.Generator().manual_seed(1)
            first, last = blocks[0] * pool.block_size, (blocks[0] + len(blocks)) * pool.block_size
            for layer in pool.k:  # in place, row range by row range: no temporary of the KV's size
                for cache in (pool.k[layer], pool.v[layer]):  # [Hkv, rows, hd]
                    for lo in range(first, last, 1 << 16):
                        cache[:, lo: min(lo + (1 << 16), last)].normal_(generator=g)
            for layer in pool.conv:
                pool.conv[layer][req.slot].normal_(0.0, 0.5, generator=g)
                pool.ssm[layer][req.slot].normal_(0.0, 0.5, generator=g)
            req.num_computed, req.status = n - 1, Status.RUNNING
            eng.scheduler.running.append(req)
        times = []
        while eng.has_unfinished():
            t = time.perf_counter()
            outs = eng.step()
            times.append((time.perf_counter() - t, sum(len(o.new_token_ids) for o in outs)))
        steady = [dt for dt, k in times[2:] if k == 1]  # after two warm-up steps, one token per step
        result["ms_per_token"] = 1000 * sorted(steady)[len(steady) // 2]
        result["ms_per_token_mean"] = 1000 * sum(steady) / len(steady)
        result["decode_steps"] = len(steady)
        result["decode_state"] = args.decode_state
    result["peak_rss"] = rss_status()["VmHWM"]
    print("RESULT " + json.dumps(result), flush=True)


def run_child(script_args: list[str]) -> dict:
    """Run one measurement in a fresh interpreter; its progress lines pass through to stderr."""
    proc = subprocess.run([sys.executable, __file__, *script_args], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(script_args)} failed with status {proc.returncode}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# ---- the run ------------------------------------------------------------------------------------------------

def fmt_time(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,super", help="comma-separated: tiny, super, super-wide (default tiny,super)")
    ap.add_argument("--lengths", default=None, help="prefill lengths, e.g. 4K,16K,1M (default 4K,16K,64K,256K)")
    ap.add_argument("--decode-lengths", default=None, help="decode contexts (default 1K,32K,128K,512K,1M)")
    ap.add_argument("--quick", action="store_true", help="prefill 4K,8K,16K; decode 1K,4K,16K; 12 decode tokens")
    ap.add_argument("--full", action="store_true", help="add 1M to the prefill lengths (hours)")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill tokens per engine step (max_num_batched_tokens)")
    ap.add_argument("--new-tokens", type=int, default=24, help="decode tokens timed per context")
    ap.add_argument("--decode-state", choices=("synthetic", "prefill"), default="synthetic",
                    help="how a decode context is built (see the module doc)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--compare-attention", action="store_true",
                    help="also time each decode with the PyTorch attention paths instead of the native kernel")
    ap.add_argument("--torch-attention", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write every result to this JSON file")
    ap.add_argument("--child", choices=("prefill", "decode"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [parse_tokens(x) for x in (args.lengths or ("4K,8K,16K" if args.quick else "4K,16K,64K,256K")).split(",")]
    if args.full and (1 << 20) not in lengths:
        lengths.append(1 << 20)
    decode_lengths = [parse_tokens(x) for x in
                      (args.decode_lengths or ("1K,4K,16K" if args.quick else "1K,32K,128K,512K,1M")).split(",")]
    new_tokens = 12 if args.quick and args.new_tokens == 24 else args.new_tokens
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r} ({', '.join(MODELS)})")
    common = ["--chunk", str(args.chunk)] + (["--threads", str(args.threads)] if args.threads else [])

    print("# measuring the machine ...", file=sys.stderr, flush=True)
    bw, copy_bw, gemm = measure_bandwidth(), measure_copy_bandwidth(), measure_gemm()
    print(f"# machine: {torch.get_num_threads()} threads, read bandwidth {bw / 1e9:.1f} GB/s (sum over 512 MiB), "
          f"copy {copy_bw / 1e9:.1f} GB/s, fp32 GEMM {gemm / 1e9:.0f} GFLOP/s; torch {torch.__version__}")
    print(f"# prefill: chunks of {args.chunk} tokens, one sequence, fp32; each length in a fresh process; "
          f"decode context: {'synthesized (random KV + Mamba states of the exact sizes; exact for timing)' if args.decode_state == 'synthetic' else 'real prefill'}")
    results: list[dict] = []
    for name in models:
        config = model_config(name)
        model, source = build_model(name)
        active = active_weight_bytes(model)
        mem = memory_terms(config)
        wbytes = weight_bytes(model)
        del model
        c = config
        print(f"\n## {name}: {source}; pattern {c.pattern} ({c.pattern.count('M')} M / {c.pattern.count('E')} E / "
              f"{c.pattern.count('*')} *), hidden {c.hidden_size}, attention {c.num_attention_heads}/"
              f"{c.num_key_value_heads} heads x {c.head_dim}")
        print(f"# weights {wbytes / MB:.1f} MiB (active per token {active / MB:.1f} MiB), KV {mem['kv_per_token']} "
              f"B/token ({mem['kv_per_token'] * (1 << 20) / 2**30:.2f} GiB at 1M), Mamba states "
              f"{mem['states'] / MB:.2f} MiB per sequence", flush=True)
        attn_rate = measure_attention(config, args.chunk)
        if not args.no_prefill:
            short = 2 * args.chunk  # a first chunk and one continuation: every code path of a long prefill
            print(f"# [{name}] calibration: a two-chunk prompt ({short} tokens) for the RSS constant and the "
                  f"linear prefill rate ...", file=sys.stderr, flush=True)
            calib = run_child(["--child", "prefill", "--model", name, "--length", str(short), *common])
            const = calib["peak_rss"] - predicted_rss(c, calib["weights"], short, 0)
            linear_rate = short / calib["seconds"]
            print(f"# RSS constant C = {const / MB:.0f} MiB (runtime after imports {calib['runtime_rss'] / MB:.0f} MiB, "
                  f"the rest: model building, a chunk's activations, allocator slack); linear prefill rate ~{linear_rate:,.0f} tok/s; "
                  f"attention {attn_rate / 1e9:.0f} GFLOP/s")
            attn_layers = c.pattern.count("*")

            def estimate(n: int) -> float:
                attn = attn_layers * 4 * c.num_attention_heads * c.head_dim * n * n / 2
                return n / linear_rate + attn / attn_rate

            print("# expected prefill times: " + ", ".join(f"{fmt_tokens(n)} ~{fmt_time(estimate(n))}" for n in lengths)
                  + f" (total ~{fmt_time(sum(estimate(n) for n in lengths))}; 1M would take ~{fmt_time(estimate(1 << 20))})",
                  flush=True)
            rows = []
            for n in lengths:
                print(f"# [{name}] prefill {fmt_tokens(n)} (expected ~{fmt_time(estimate(n))}) ...", file=sys.stderr,
                      flush=True)
                r = run_child(["--child", "prefill", "--model", name, "--length", str(n), *common])
                r["rss_constant"] = const
                results.append(r)
                tok_s = n / r["seconds"]
                roof = n / (prefill_flops(c, active, n) / gemm)
                pred = predicted_rss(c, r["weights"], n, const)
                rows.append((fmt_tokens(n), f"{r['seconds']:,.1f}", f"{tok_s:,.0f}", f"{roof:,.0f}",
                             f"{tok_s / roof:.0%}", f"{r['peak_rss'] / MB:,.0f}", f"{pred / MB:,.0f}",
                             f"{(r['peak_rss'] - pred) / pred:+.1%}"))
                print(f"  {name} prefill {fmt_tokens(n):>5}: {r['seconds']:8.1f} s {tok_s:9,.0f} tok/s  roofline "
                      f"{roof:9,.0f} tok/s  peak RSS {r['peak_rss'] / MB:8,.0f} MiB  predicted {pred / MB:8,.0f} MiB "
                      f"({(r['peak_rss'] - pred) / pred:+.1%})", flush=True)
            print(f"\n### {name}: prefill (RSS predicted = weights {wbytes / MB:.1f} MiB + T x {mem['kv_per_token']} B "
                  f"+ states {mem['states'] / MB:.2f} MiB + C {const / MB:.0f} MiB)\n")
            print("| prompt | time (s) | tok/s | roofline tok/s | of roofline | peak RSS (MiB) | predicted RSS (MiB) | diff |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|")
            for row in rows:
                print("| " + " | ".join(row) + " |")
        if not args.no_decode:
            drows, base = [], None
            checks = [(decode_lengths[0], "prefill")] if args.quick and args.decode_state == "synthetic" else []
            for n, how in [(n, args.decode_state) for n in decode_lengths] + checks:
                print(f"# [{name}] decode at {fmt_tokens(n)} of context ({how}) ...", file=sys.stderr, flush=True)
                r = run_child(["--child", "decode", "--model", name, "--length", str(n), "--new-tokens",
                               str(new_tokens), "--decode-state", how, *common])
                results.append(r)
                ms = r["ms_per_token"]
                roof_ms = 1000 * decode_bytes(c, active, n) / bw
                if base is None:
                    base = (n, ms, roof_ms)
                slow, pslow = ms / base[1], roof_ms / base[2]
                label = fmt_tokens(n) + (" (real prefill)" if how == "prefill" and args.decode_state != "prefill" else "")
                row = [label, f"{ms:.2f}", f"{slow:.2f}x", f"{roof_ms:.3f}", f"{pslow:.2f}x",
                       f"{(slow - pslow) / pslow:+.0%}", f"{roof_ms / ms:.0%}", f"{r['peak_rss'] / MB:,.0f}"]
                print(f"  {name} decode @{label:>5}: {ms:8.2f} ms/token (mean {r['ms_per_token_mean']:.2f})  "
                      f"slowdown {slow:6.2f}x  roofline {roof_ms:8.3f} ms ({pslow:6.2f}x)", flush=True)
                if args.compare_attention:
                    rt = run_child(["--child", "decode", "--model", name, "--length", str(n), "--new-tokens",
                                    str(new_tokens), "--decode-state", how, "--torch-attention", *common])
                    rt["torch_attention"] = True
                    results.append(rt)
                    row += [f"{rt['ms_per_token']:.2f}", f"{rt['ms_per_token'] / ms:.2f}x"]
                    print(f"  {name} decode @{label:>5}: {rt['ms_per_token']:8.2f} ms/token with PyTorch attention",
                          flush=True)
                drows.append(tuple(row))
            print(f"\n### {name}: decode, one sequence (median of {new_tokens} steps after 2 warm-up steps; slowdowns "
                  f"against {fmt_tokens(base[0])}; context {'synthesized: random KV and Mamba states of the exact sizes' if args.decode_state == 'synthetic' else 'prefilled'})\n")
            extra_cols = " PyTorch attention ms/token | native speedup |" if args.compare_attention else ""
            print("| context | ms/token | slowdown | roofline ms/token | roofline slowdown | slowdown vs roofline's "
                  "| of roofline | peak RSS (MiB) |" + extra_cols)
            print("|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.compare_attention else ""))
            for row in drows:
                print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(bandwidth=bw, copy_bandwidth=copy_bw, gemm=gemm, results=results),
                                              indent=1))


if __name__ == "__main__":
    main()
