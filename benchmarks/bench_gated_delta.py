"""Gated delta rule throughput: hylm chunked vs hylm recurrent vs transformers' torch implementations.

    python3 benchmarks/bench_gated_delta.py            # 1K, 4K, 16K, 64K tokens
    python3 benchmarks/bench_gated_delta.py --quick    # 1K and 4K, fewer repeats
    python3 benchmarks/bench_gated_delta.py --kda      # per-key-channel gates (hylm only: transformers has none)
    python3 benchmarks/bench_gated_delta.py --threads 1  # steadier numbers on a shared machine

One sequence (B = 1) of T tokens through one layer's op with Qwen3-Next head geometry scaled down by
default (Hk=4, Hv=8, dk=dv=128; --hk/--hv to change), q/k L2-normalised in the op, fp32 inputs.
Prints tokens/s per implementation and the max |difference| of each output from hylm's chunked one.
The token-by-token loops (hylm recurrent in torch, transformers' recurrent) cost exactly the same per
token at any T, so past --recurrent-cap tokens they are timed on the first cap tokens only (marked *).
On CUDA, hylm's recurrent form is the Triton kernel and is timed at every length.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hylm.ops.gated_delta import gated_delta_chunked, gated_delta_recurrent  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up (and Triton compilation)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lengths", type=int, nargs="*")
    ap.add_argument("--hk", type=int, default=4)
    ap.add_argument("--hv", type=int, default=8)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--kda", action="store_true")
    ap.add_argument("--recurrent-cap", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lengths = args.lengths or ([1024, 4096] if args.quick else [1024, 4096, 16384, 65536])
    repeats = args.repeats or (1 if args.quick else 2)
    cap = args.recurrent_cap or (1024 if device.type == "cpu" else 1 << 30)

    hf = None
    if not args.no_transformers and not args.kda:
        try:
            from transformers.models.qwen3_next import modeling_qwen3_next as hf
        except Exception as e:  # noqa: BLE001
            print(f"(transformers unavailable: {e})")

    print(f"device={device} threads={torch.get_num_threads()} Hk={args.hk} Hv={args.hv} dk={args.dk} "
          f"dv={args.dv} chunk={args.chunk} gates={'KDA' if args.kda else 'scalar'}")
    header = (f"{'T':>7} | {'hylm chunked':>13} | {'hylm recurrent':>15} | {'hf chunk':>13} | "
              f"{'hf recurrent':>13} | max|diff|")
    print(header)
    print("-" * len(header))
    for T in lengths:
        gen = torch.Generator().manual_seed(T)
        q = torch.randn(1, T, args.hk, args.dk, generator=gen).to(device)
        k = torch.randn(1, T, args.hk, args.dk, generator=gen).to(device)
        v = torch.randn(1, T, args.hv, args.dv, generator=gen).to(device)
        gshape = (1, T, args.hv, args.dk) if args.kda else (1, T, args.hv)
        g = (-F.softplus(torch.randn(gshape, generator=gen) - 2.0)).to(device)
        beta = torch.sigmoid(torch.randn(1, T, args.hv, generator=gen)).to(device)
        kw = dict(l2norm_qk=True)

        t_chunk, (o_ref, _) = timed(lambda: gated_delta_chunked(q, k, v, g, beta, chunk_size=args.chunk, **kw),
                                    device, repeats)
        row = [f"{T:>7}", f"{T / t_chunk:>13,.0f}"]
        diffs = []

        tr = min(T, cap)
        sl = (slice(None), slice(0, tr))
        t_rec, (o_rec, _) = timed(lambda: gated_delta_recurrent(q[sl], k[sl], v[sl], g[sl], beta[sl], **kw),
                                  device, 1)
        row.append(f"{tr / t_rec:>14,.0f}{'*' if tr < T else ' '}")
        diffs.append((o_rec - o_ref[:, :tr]).abs().max().item())

        if hf is not None:
            t_hc, (o_hc, _) = timed(lambda: hf.torch_chunk_gated_delta_rule(
                q, k, v, g, beta, chunk_size=args.chunk, output_final_state=True, use_qk_l2norm_in_kernel=True),
                device, repeats)
            row.append(f"{T / t_hc:>13,.0f}")
            diffs.append((o_hc - o_ref).abs().max().item())
            t_hr, (o_hr, _) = timed(lambda: hf.torch_recurrent_gated_delta_rule(
                q[sl], k[sl], v[sl], g[sl], beta[sl], output_final_state=True, use_qk_l2norm_in_kernel=True),
                device, 1)
            row.append(f"{tr / t_hr:>12,.0f}{'*' if tr < T else ' '}")
            diffs.append((o_hr - o_ref[:, :tr]).abs().max().item())
        else:
            row += [f"{'-':>13}", f"{'-':>13}"]
        row.append(f"{max(diffs):.1e}")
        print(" | ".join(row), flush=True)
        del q, k, v, g, beta, o_ref
    print("tokens/s; * = timed on the first", cap, "tokens (per-token cost is independent of T)")


if __name__ == "__main__":
    main()
