"""Tensor / expert parallelism on CPU: bytes moved per token, weights per rank, tokens/s for 1 vs 2 processes.

    python3 benchmarks/bench_parallel.py            # full run (a few minutes on 2 idle cores)
    python3 benchmarks/bench_parallel.py --quick    # smoke run

Communication is counted from the tensors the model hands to its collectives (hylm.parallel.group.
Communicator): the all-reduces (block outputs, embedding, MoE combine), the gather of the vocabulary
slices to rank 0, and rank 0's control messages. "Latent dispatch" compares expert parallelism summing
the ranks' routed outputs in the latent space (before fc2_latent_proj, what hylm does) with summing them
at hidden size (after it). A second, Super-shaped model (hidden 4096, latent 1024: only the MoE layer's
projections at Super's sizes) gives the same count at Super's dimensions.

Throughput runs the engine (rank 0 drives rank 1) on a random model: 1 process with all the threads vs
2 processes with half each, so both use the same cores. 2 CPU processes share one memory bus; this
measures the overhead of the split (gloo over loopback), not a speed-up from more hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hylm  # noqa: E402
from hylm.config import MOE, ModelConfig  # noqa: E402
from hylm.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from hylm.engine.sampling_params import SamplingParams  # noqa: E402
from hylm.model import Batch, NemotronHModel  # noqa: E402
from hylm.parallel import (ParallelLayout, RankZeroModel, init_group, leave_group, load_parallel_model,  # noqa: E402
                           parameter_bytes, serve_rank_zero)
from hylm.config import preset  # noqa: E402
from hylm.parallel import build_local_model  # noqa: E402
from hylm.parallel.group import Communicator, free_port  # noqa: E402
from hylm.weights import save_hf_checkpoint  # noqa: E402

BENCH = ModelConfig(vocab_size=32000, hidden_size=512, pattern="ME*EMEME", num_attention_heads=8,
                    num_key_value_heads=2, head_dim=64, mamba_num_heads=16, mamba_head_dim=64, ssm_state_size=64,
                    n_groups=2, chunk_size=128, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
                    moe_shared_expert_intermediate_size=512, moe_latent_size=128, intermediate_size=512,
                    max_position_embeddings=1 << 20, eos_token_id=2)
# Super's MoE-layer sizes where they set the traffic (hidden 4096, latent 1024); few, small experts
SUPER_SHAPED = ModelConfig(vocab_size=512, hidden_size=4096, pattern="E", n_routed_experts=8, num_experts_per_tok=4,
                           moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, moe_latent_size=1024,
                           eos_token_id=2)
SUPER_LAYERS, SUPER_MOE_LAYERS = 88, 40

# name -> (tensor parallel size, expert parallel size, combine in latent space)
LAYOUTS = {"TP=2": (2, 1, True), "EP=2 latent": (1, 2, True), "EP=2 hidden": (1, 2, False), "TP=2+EP": (2, 2, True)}


def count_bytes(model, comm, tokens: int, batch: int) -> dict:
    """Collective bytes per token: a prefill of `tokens` tokens, then one decode step of `batch` sequences."""
    out = {}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for phase, b, t in (("prefill", 1, tokens), ("decode", batch, 1)):
            ids = torch.randint(3, model.config.vocab_size, (b * t,), generator=g)
            comm.reset_counts()
            model.logits(model.hidden_states(ids, Batch.uniform(b, t))[Batch.uniform(b, t).last_token_rows()])
            out[phase] = {op: n / (b * t) for op, n in comm.bytes.items()}
    return out


def engine_run(model, prompts: list[list[int]], new_tokens: int) -> dict:
    """Prefill tok/s (until every request has its first token) and decode tok/s (the rest)."""
    eng = LLMEngine(model, EngineConfig(max_num_seqs=len(prompts), max_model_len=2048, max_num_batched_tokens=4096))
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in prompts]
    got: dict[str, int] = {}
    t0 = time.perf_counter()
    while len(got) < len(ids):
        for o in eng.step():
            got[o.request_id] = len(o.output_ids)
    t1 = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    t2 = time.perf_counter()
    return {"prefill_tok_s": sum(map(len, prompts)) / (t1 - t0),
            "decode_tok_s": len(prompts) * (new_tokens - 1) / (t2 - t1)}


def rank_main(rank: int, port: int, work: str, settings: dict) -> None:
    torch.set_num_threads(settings["threads_per_rank"])
    comm = init_group(rank, 2, f"tcp://127.0.0.1:{port}")
    results = {}
    for name, (tp, ep, latent) in LAYOUTS.items():
        layout = ParallelLayout.from_sizes(tp, ep, rank, combine_in_latent=latent)
        for model_name in ("bench", "super_shaped"):
            model, report = load_parallel_model(Path(work) / model_name, layout, comm)
            results[(name, model_name, "bytes")] = count_bytes(model, comm, settings["prompt_len"], settings["batch"])
            results[(name, model_name, "param_bytes", rank)] = parameter_bytes(model)
            results[(name, model_name, "bytes_read", rank)] = report.bytes_read
        cls = RankZeroModel if rank == 0 else NemotronHModel
        model, _ = load_parallel_model(Path(work) / "bench", layout, comm, model_class=cls)
        if rank == 0:
            model.attach(comm)
            engine_run(model, settings["prompts"][:1], 3)  # warm-up
            comm.reset_counts()
            results[(name, "engine")] = engine_run(model, settings["prompts"], settings["new_tokens"])
            results[(name, "control_bytes")] = comm.bytes["control"]
            model.stop_ranks()
        else:
            serve_rank_zero(model, comm)
    torch.save(results, Path(work) / f"rank{rank}.pt")
    leave_group()


def preset_weights_per_rank() -> None:
    """Weights per rank of the published models, from the rank models' shapes (meta device: nothing is
    allocated or loaded), in bf16."""
    print("\nWeights per rank in bf16 (largest rank), from the sharded models' shapes; MTP excluded")
    layouts = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 4), (8, 1), (8, 8)]
    print(f"  {'model':<28}" + "".join(f"{f'TP={tp} EP={ep}':>14}" for tp, ep in layouts))
    for name in ("nemotron-3-super-120b-a12b", "nemotron-3-nano-30b-a3b"):
        cfg = preset(name)
        row = []
        for tp, ep in layouts:
            held = 0
            for rank in range(max(tp, ep)):
                if max(tp, ep) == 1:
                    with torch.device("meta"):
                        model = NemotronHModel(cfg.replace(num_nextn_predict_layers=0, mtp_pattern=""))
                else:
                    layout = ParallelLayout.from_sizes(tp, ep, rank)
                    comm = Communicator(rank, layout.world_size, torch.device("cpu"))  # no collective is run
                    model = build_local_model(cfg, layout, comm)
                held = max(held, sum(t.numel() for t in model.parameters()) * 2)
            row.append(f"{held / 2**30:.1f} GiB")
        print(f"  {name:<28}" + "".join(f"{v:>14}" for v in row))


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short prompts and few tokens (smoke run)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores shared by all processes")
    args = ap.parse_args()
    prompt_len, batch, new_tokens = (64, 4, 8) if args.quick else (512, 8, 64)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, BENCH.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    settings = dict(prompt_len=prompt_len, batch=batch, new_tokens=new_tokens, prompts=prompts,
                    threads_per_rank=max(1, args.threads // 2))

    with tempfile.TemporaryDirectory() as work:
        full = {}
        for name, cfg in (("bench", BENCH), ("super_shaped", SUPER_SHAPED)):
            full[name] = hylm.load_model(cfg, seed=0)
            save_hf_checkpoint(full[name], Path(work) / name)
        torch.set_num_threads(args.threads)
        single = hylm.load_model(Path(work) / "bench")
        engine_run(single, prompts[:1], 3)  # warm-up
        one = engine_run(single, prompts, new_tokens)
        mp.spawn(rank_main, args=(free_port(), work, settings), nprocs=2, join=True)
        r0, r1 = (torch.load(Path(work) / f"rank{r}.pt") for r in range(2))

    c = BENCH
    print(f"model: hidden {c.hidden_size}, latent {c.moe_latent_size}, {c.n_routed_experts} experts top "
          f"{c.num_experts_per_tok}, pattern {c.pattern}, vocab {c.vocab_size}, fp32; prompts {batch} x "
          f"{prompt_len} tokens, {new_tokens} new tokens each; {args.threads} threads in all")
    full_bytes = parameter_bytes(full["bench"])
    print(f"\n{'layout':<13} {'weights/rank (of full)':>30} {'all-reduce B/tok':>17} {'gather B/tok':>13} "
          f"{'control B/step':>15} {'prefill tok/s':>14} {'decode tok/s':>13} {'vs 1 proc':>10}")
    print(f"{'1 process':<13} {mib(full_bytes):>30} {'-':>17} {'-':>13} {'-':>15} {one['prefill_tok_s']:>14.1f} "
          f"{one['decode_tok_s']:>13.1f} {'1.00':>10}")
    steps = 1 + new_tokens  # about: one prefill step, then one step per new token
    for name in LAYOUTS:
        held = [r[(name, "bench", "param_bytes", k)] for k, r in enumerate((r0, r1))]
        b = r0[(name, "bench", "bytes")]
        e = r0[(name, "engine")]
        share = " / ".join(f"{h / full_bytes:.0%}" for h in held)
        print(f"{name:<13} {mib(max(held)) + ' (' + share + ')':>30} "
              f"{b['prefill'].get('all_reduce', 0):>8.0f} / {b['decode'].get('all_reduce', 0):<6.0f} "
              f"{b['decode'].get('gather', 0):>13.0f} {r0[(name, 'control_bytes')] / steps:>15.0f} "
              f"{e['prefill_tok_s']:>14.1f} {e['decode_tok_s']:>13.1f} "
              f"{e['decode_tok_s'] / one['decode_tok_s']:>10.2f}")
    print("(all-reduce B/tok: prefill / decode; gather: rank 0 receives the vocabulary slices of the sampled rows)")

    print("\nLatent dispatch, EP=2: all-reduce bytes per token (counted)")
    for model_name, cfg in (("bench", BENCH), ("super_shaped", SUPER_SHAPED)):
        n_moe = cfg.pattern.count(MOE)
        lat = r0[("EP=2 latent", model_name, "bytes")]["decode"]["all_reduce"] / n_moe
        hid = r0[("EP=2 hidden", model_name, "bytes")]["decode"]["all_reduce"] / n_moe
        print(f"  {model_name:<13} hidden {cfg.hidden_size}, latent {cfg.moe_latent_size}: per MoE layer "
              f"{lat:.0f} B with latent dispatch, {hid:.0f} B without ({hid / lat:.1f}x)")
    sup = {name: r0[(name, "super_shaped", "bytes")]["decode"].get("all_reduce", 0) for name in LAYOUTS}
    print(f"  Super (88 layers, 40 MoE), bf16, per decode token from the counts above: EP=2 "
          f"{sup['EP=2 latent'] / 2 * SUPER_MOE_LAYERS / 1024:.0f} KiB with latent dispatch, "
          f"{sup['EP=2 hidden'] / 2 * SUPER_MOE_LAYERS / 1024:.0f} KiB without; TP=2 "
          f"{sup['TP=2'] / 2 / 2 * (SUPER_LAYERS + 1) / 1024:.0f} KiB (one hidden-size all-reduce per block "
          f"and the embedding)")
    preset_weights_per_rank()
    print(json.dumps({"one_process": one, **{name: r0[(name, "engine")] for name in LAYOUTS}}))


if __name__ == "__main__":
    main()
