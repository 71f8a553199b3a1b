"""hylm vs transformers and llama.cpp on the same random model, same run.

    python3 benchmarks/bench_cpu.py            # full table (a few minutes on 2 cores)
    python3 benchmarks/bench_cpu.py --quick    # shorter contexts, for a smoke run
    python3 benchmarks/bench_cpu.py --compare-kernels   # adds hylm with its dense products on MKL (F.linear)

Prints prefill tok/s at several prompt lengths, single-stream decode tok/s at those contexts, aggregate
decode tok/s at several batch sizes, each with the hylm/transformers ratio, plus the rooflines and
hylm's fraction of them: decode, active weight bytes + KV + state bytes per token over the measured memory
bandwidth; prefill, the FLOPs a prefill cannot avoid (`prefill_flops`) over the measured fp32 GEMM FLOP/s.

Where llama-cpp-python is installed, the same weights exported by `hylm export-gguf` (f32 and q8_0) run in
llama.cpp as a second peer: prefill and single-stream decode (its high-level API drives one sequence, so
no batched rows). llama.cpp runs with its defaults otherwise (f16 KV cache), as its users run it. hylm also runs
the q8_0 file (its Q8_0 products stay packed; --no-q8 skips it): the "hylm q8_0" column.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hylm  # noqa: E402
from hylm.config import ModelConfig  # noqa: E402
from hylm.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from hylm.engine.sampling_params import SamplingParams  # noqa: E402
from hylm.ops import linear as linear_op  # noqa: E402
from hylm.weights import save_hf_checkpoint  # noqa: E402

BENCH = ModelConfig(vocab_size=32000, hidden_size=512, pattern="ME*EMEME", num_attention_heads=8,
                    num_key_value_heads=2, head_dim=64, mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64,
                    n_groups=2, chunk_size=128, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
                    moe_shared_expert_intermediate_size=512, moe_latent_size=128, intermediate_size=512,
                    max_position_embeddings=1 << 20, eos_token_id=2)


def measure_bandwidth() -> float:
    """Read bandwidth in bytes/s: a sum over a buffer far larger than the caches."""
    x = torch.ones(256 * 1024 * 1024 // 4)
    x.sum()
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def measure_flops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best


def active_weight_bytes(model) -> int:
    c = model.config
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp.") or name == "model.embeddings.weight":
            continue  # the embedding lookup reads one row
        n = p.numel()
        if ".experts." in name:
            n = n * c.num_experts_per_tok // c.n_routed_experts
        total += n * p.element_size()
    return total


def prefill_flops(model, length: int) -> float:
    """Multiply-adds x 2 that a prefill of `length` tokens cannot avoid: every active matrix (routed experts at
    top_k / n_routed, no embedding lookup) once per token, the lm_head once (only the last token's logits are
    needed), causal attention (q.k and p.v over the tokens before each one) and Mamba-2's chunked scan
    (within a chunk: C.B over the chunk and its product with x; across chunks: each token's state update
    and readout)."""
    c = model.config
    params = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp.") or name in ("model.embeddings.weight", "lm_head.weight"):
            continue
        n = p.numel()
        if ".experts." in name:
            n = n * c.num_experts_per_tok // c.n_routed_experts
        params += n
    flops = 2.0 * params * length + 2.0 * c.vocab_size * c.hidden_size
    heads, hd, state, q = c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, min(c.chunk_size, length)
    for kind in c.pattern:
        if kind == "*":  # causal: token i reads i keys, twice (scores and values)
            flops += 4.0 * c.num_attention_heads * c.head_dim * length * (length + 1) / 2
        elif kind == "M":
            per_token = 2 * q * state * c.n_groups / 2 + 2 * q * hd * heads / 2 + 4 * hd * state * heads
            flops += per_token * length
    return flops


def median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


# ---- hylm ----------------------------------------------------------------------------------------------
def hylm_prefill(model, length: int) -> float:
    eng = LLMEngine(model, EngineConfig(max_num_seqs=1, max_model_len=length + 8, max_num_batched_tokens=4096))
    prompt = torch.randint(3, BENCH.vocab_size, (length,)).tolist()
    t = time.perf_counter()
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
    while eng.has_unfinished():
        eng.step()
    return length / (time.perf_counter() - t)


def hylm_decode(model, batch: int, context: int, new_tokens: int) -> float:
    eng = LLMEngine(model, EngineConfig(max_num_seqs=batch, max_model_len=context + new_tokens + 8,
                                        max_num_batched_tokens=4096))
    for _ in range(batch):
        eng.add_request(torch.randint(3, BENCH.vocab_size, (context,)).tolist(),
                        SamplingParams(temperature=0, max_tokens=new_tokens + 1, ignore_eos=True))
    while any(r.num_output == 0 for r in eng.requests.values()):  # prefill everything first
        eng.step()
    produced, t = 0, time.perf_counter()
    while eng.has_unfinished():
        produced += len(eng.step())
    return produced / (time.perf_counter() - t)


# ---- llama.cpp ----------------------------------------------------------------------------------------
def write_placeholder_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE vocabulary of vocab_size made-up tokens: llama.cpp needs a vocabulary to size its
    logits, and the benchmark feeds token ids, so what the tokens spell does not matter."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    vocab[alphabet[0] + alphabet[1]] = len(vocab)  # the one merge's result (llama.cpp wants merges present)
    while len(vocab) < vocab_size:
        vocab[f"tok{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(alphabet[0], alphabet[1])]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))


def export_for_llama_cpp(directory: Path, qtype: str) -> Path:
    from hylm.weights.gguf_export import export_gguf

    out = directory / f"bench-{qtype}.gguf"
    out.unlink(missing_ok=True)
    export_gguf(directory, out, qtype, progress=False)
    return out


def load_llama_cpp(path: Path, n_ctx: int, threads: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, verbose=False)


def llama_last_logits(llm):
    """The last evaluated token's logits (llama-cpp-python only fills `scores` with logits_all)."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def llama_prefill(llm, length: int) -> float:
    ids = torch.randint(3, BENCH.vocab_size, (length,)).tolist()
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    return length / (time.perf_counter() - t)


def llama_decode(llm, context: int, new_tokens: int) -> float:
    llm.reset()
    llm.eval(torch.randint(3, BENCH.vocab_size, (context,)).tolist())
    nxt = 5
    t = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([nxt])
        nxt = int(llama_last_logits(llm).argmax())  # greedy, as the hylm and transformers rows
    return new_tokens / (time.perf_counter() - t)


# ---- transformers --------------------------------------------------------------------------------------
def load_transformers(directory: Path):
    from transformers import NemotronHForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    m = NemotronHForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    for mod in m.modules():  # same dt limit as hylm (see REFERENCE: transformers clamps in prefill only)
        if hasattr(mod, "time_step_limit"):
            mod.time_step_limit = (0.0, math.inf)
    return m


@torch.inference_mode()
def hf_prefill(m, length: int) -> float:
    ids = torch.randint(3, BENCH.vocab_size, (1, length))
    t = time.perf_counter()
    m(ids, use_cache=True, logits_to_keep=1)
    return length / (time.perf_counter() - t)


@torch.inference_mode()
def hf_decode(m, batch: int, context: int, new_tokens: int) -> float:
    ids = torch.randint(3, BENCH.vocab_size, (batch, context))
    out = m(ids, use_cache=True, logits_to_keep=1)
    cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(new_tokens):
        out = m(nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return batch * new_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--no-q8", action="store_true", help="skip hylm on the q8_0 GGUF export of the same weights")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1,
                    help="hylm and transformers measurements alternate this many times per row and the row shows "
                         "the medians (this machine's speed drifts by up to 25%% between runs)")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="decoded tokens timed per decode measurement (default 128, 16 with --quick)")
    ap.add_argument("--compare-kernels", action="store_true",
                    help="also run hylm with its dense products on F.linear (MKL) instead of oneDNN: a column "
                         "showing what hylm.ops.linear gains")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    contexts = [256, 1024] if args.quick else [256, 4096, 16384]
    batches = [1, 8] if args.quick else [1, 8, 32]
    # decode rows time this many tokens per run: 32 (until session 7) took ~0.2 s for hylm, short enough for one
    # of this machine's slow spells to decide a row
    new_tokens = args.new_tokens or (16 if args.quick else 128)

    bw, flops = measure_bandwidth(), measure_flops()
    model = hylm.load_model(BENCH, seed=0)
    tmp = Path("/tmp/hylm-bench-model")
    save_hf_checkpoint(model, tmp)
    hf = None if args.no_transformers else load_transformers(tmp)
    llama_files: dict[str, Path] = {}
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
            write_placeholder_tokenizer(tmp, BENCH.vocab_size)
            llama_files = {q: export_for_llama_cpp(tmp, q) for q in ("f32", "q8_0")}
        except ImportError:
            print("# llama.cpp: llama-cpp-python not installed (pip install llama-cpp-python), skipped")
    q8_model = None
    if not args.no_q8:  # hylm on the q8_0 GGUF of the same weights (Q8_0 products stay packed)
        write_placeholder_tokenizer(tmp, BENCH.vocab_size)
        q8_model = hylm.load_model(llama_files.get("q8_0") or export_for_llama_cpp(tmp, "q8_0"))
    wbytes = active_weight_bytes(model)
    kv_tok = BENCH.kv_cache_bytes_per_token(4)
    state = BENCH.ssm_state_bytes_per_sequence(4)
    print(f"# model: {BENCH.pattern}, hidden {BENCH.hidden_size}, vocab {BENCH.vocab_size}, fp32, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, active weights {wbytes / 1e6:.1f} MB/token")
    print(f"# machine: {torch.get_num_threads()} threads, read bandwidth {bw / 1e9:.1f} GB/s, fp32 GEMM {flops / 1e9:.0f} GFLOP/s")
    print(f"# torch {torch.__version__}")
    rows = []
    mkl: dict[str, float] = {}

    def both_paths(fn, *fn_args) -> tuple[float, float | None]:
        """hylm's dense products through oneDNN (its default on CPU) and, with --compare-kernels, through
        F.linear (MKL), in that order."""
        fast = fn(*fn_args)
        if not args.compare_kernels:
            return fast, None
        linear_op.enabled = False
        try:
            return fast, fn(*fn_args)
        finally:
            linear_op.enabled = True

    def row(name, hh, t, roof=None):
        h, m = hh
        if m:
            mkl[name] = m
        ratio = f"{h / t:.2f}x" if t else "-"
        frac = f"{h / roof:.0%}" if roof else "-"
        rows.append((name, h, t, ratio, roof, frac))
        print(f"{name:<34} hylm {h:>9,.1f}  transformers {t or 0:>9,.1f}  ratio {ratio:>7}  roofline {roof or 0:>8,.0f}  "
              f"hylm/roofline {frac}" + (f"  hylm with MKL products {m:,.1f}" if m else ""), flush=True)

    hylm_prefill(model, 256)  # warm-up: first calls allocate and initialise kernels
    if hf:
        hf_prefill(hf, 256)

    def measure(hylm_fn, hf_fn, *fn_args) -> tuple[tuple[float, float | None], float | None]:
        """hylm (both product routes with --compare-kernels) and transformers alternately, --repeats times:
        the medians."""
        runs_h, runs_m, runs_t = [], [], []
        for _ in range(args.repeats):
            h, m = both_paths(hylm_fn, model, *fn_args)
            runs_h.append(h)
            if m is not None:
                runs_m.append(m)
            if hf:
                runs_t.append(hf_fn(hf, *fn_args))
        return (median(runs_h), median(runs_m)), median(runs_t)

    for n in contexts:
        h, t = measure(hylm_prefill, hf_prefill, n)
        row(f"prefill {n} tok/s", h, t, roof=flops * n / prefill_flops(model, n))
    for n in contexts:
        h, t = measure(hylm_decode, hf_decode, 1, n, new_tokens)
        roof = bw / (wbytes + n * kv_tok + 2 * state)
        row(f"decode @ctx {n} tok/s (batch 1)", h, t, roof)
    for b in batches:
        h, t = measure(hylm_decode, hf_decode, b, 128, new_tokens)
        roof = b * bw / (wbytes + b * (128 * kv_tok + 2 * state))
        row(f"aggregate decode batch {b} tok/s", h, t, roof)

    q8_rows: dict[str, float] = {}
    if q8_model is not None:
        hylm_prefill(q8_model, 256)  # warm-up
        for n in contexts:
            q8_rows[f"prefill {n} tok/s"] = median([hylm_prefill(q8_model, n) for _ in range(args.repeats)])
        for n in contexts:
            q8_rows[f"decode @ctx {n} tok/s (batch 1)"] = median(
                [hylm_decode(q8_model, 1, n, new_tokens) for _ in range(args.repeats)])
        for b in batches:
            q8_rows[f"aggregate decode batch {b} tok/s"] = median(
                [hylm_decode(q8_model, b, 128, new_tokens) for _ in range(args.repeats)])
        for name, v in q8_rows.items():
            print(f"{name:<34} hylm q8_0 {v:>9,.1f}", flush=True)
        del q8_model

    llama_rows: dict[str, dict[str, float]] = {}
    for qtype, path in llama_files.items():
        llm = load_llama_cpp(path, max(contexts) + new_tokens + 64, torch.get_num_threads())
        llama_prefill(llm, 256)  # warm-up
        for n in contexts:
            llama_rows.setdefault(f"prefill {n} tok/s", {})[qtype] = llama_prefill(llm, n)
        for n in contexts:
            llama_rows.setdefault(f"decode @ctx {n} tok/s (batch 1)", {})[qtype] = llama_decode(llm, n, new_tokens)
        for name, vals in llama_rows.items():
            if qtype in vals:
                print(f"{name:<34} llama.cpp {qtype} {vals[qtype]:>9,.1f}", flush=True)
        del llm

    num = (lambda v: f"{v:,.0f}" if v else "-")
    print("\n| measurement | hylm | transformers | hylm / transformers | llama.cpp f32 | hylm / llama.cpp f32 "
          "| hylm q8_0 | llama.cpp q8_0 | hylm / llama.cpp q8_0 | roofline | hylm / roofline |"
          + (" hylm, MKL products | oneDNN / MKL |" if mkl else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if mkl else ""))
    for name, h, t, ratio, roof, frac in rows:
        f32, q8 = (llama_rows.get(name, {}).get(q) for q in ("f32", "q8_0"))
        hq = q8_rows.get(name)
        cells = [name, num(h), num(t), ratio, num(f32), f"{h / f32:.2f}x" if f32 else "-", num(hq), num(q8),
                 f"{hq / q8:.2f}x" if hq and q8 else "-", num(roof), frac]
        if mkl:
            m = mkl.get(name)
            cells += [num(m), f"{h / m:.2f}x" if m else "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
