"""Tensor and expert parallelism over 2 CPU processes (gloo), against the single-process model.

One spawn of 2 ranks runs every scenario (starting processes is the slow part); each rank loads its
shards from checkpoints written here and saves what it saw. The tests then compare with the ordinary
single-process model loaded from the same checkpoints: logits of a prefill and decode steps, greedy
generation through the engine (rank 0 drives rank 1), the weights each rank holds, the bytes the
loader read and the bytes the collectives moved.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import hylm
from hylm.config import ATTENTION, MAMBA, MLP, MOE
from hylm.engine.sampling_params import SamplingParams
from hylm.parallel import ParallelLayout, RankZeroModel, init_group, leave_group, load_parallel_model, parameter_bytes
from hylm.parallel.group import free_port
from hylm.parallel.worker import serve_rank_zero
from hylm.weights import save_hf_checkpoint

from engine_models import TINY, random_prompts, run_staggered, tiny_model

WORLD = 2
# latent MoE with group-limited routing (4 groups of 2 experts, keep 2), one kv head for 2 ranks
# (replicated), one Mamba group (B/C and the gated norm's group span both ranks), biases on the MLPs
CONFIGS = {
    "latent": TINY.replace(num_key_value_heads=1, n_groups=1, n_group=4, topk_group=2, mlp_bias=True),
    # plain MoE (no latent), 6 experts top-3, kv heads and Mamba groups split, odd vocabulary and
    # intermediate sizes (uneven shards), biases on attention and the Mamba projections
    "plain": TINY.replace(vocab_size=257, pattern="M*E-EM*E", moe_latent_size=None, n_routed_experts=6,
                          num_experts_per_tok=3, n_group=1, topk_group=1, intermediate_size=95,
                          moe_intermediate_size=33, moe_shared_expert_intermediate_size=47,
                          attention_bias=True, use_bias=True),
}
# name -> (tensor parallel size, expert parallel size, combine in latent space)
LAYOUTS = {"tp": (2, 1, True), "ep": (1, 2, True), "ep_hidden_combine": (1, 2, False), "tp_ep": (2, 2, True)}
ENGINE_CASES = [("latent", "tp_ep"), ("plain", "tp"), ("latent", "ep")]
BATCH, PREFILL, DECODE_STEPS = 2, 11, 3  # 11: not a multiple of the chunk size 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
ENGINE = dict(join_every=2, max_num_seqs=3, max_num_batched_tokens=16, max_model_len=64)


def make_model(name: str):
    model = tiny_model(seed=3, config=CONFIGS[name])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(".bias"):  # random, so that a bias added twice or never shows
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def prompts(name: str) -> list[list[int]]:
    return random_prompts(4, 5, 20, seed=11, vocab=CONFIGS[name].vocab_size)


def layout(name: str, rank: int) -> ParallelLayout:
    tp, ep, latent = LAYOUTS[name]
    return ParallelLayout.from_sizes(tp, ep, rank, combine_in_latent=latent)


def _rank_main(rank: int, port: int, workdir: str) -> None:
    torch.set_num_threads(1)
    work = Path(workdir)
    comm = init_group(rank, WORLD, f"tcp://127.0.0.1:{port}")
    inputs = torch.load(work / "inputs.pt")
    results: dict = {}
    for cname in CONFIGS:
        for lname in LAYOUTS:
            model, report = load_parallel_model(work / cname, layout(lname, rank), comm)
            prefill, decode = inputs[cname]
            cache = model.new_cache(BATCH)
            comm.reset_counts()
            with torch.no_grad():
                logits = [model(prefill, cache)]  # [B, T, V] on rank 0
                prefill_bytes = dict(comm.bytes)
                for step in decode:
                    logits.append(model(step[:, None], cache))
                same_hidden = comm.all_gather_equal(model.hidden_states(
                    prefill.reshape(-1), hylm.model.Batch.uniform(BATCH, PREFILL)))
            results[(cname, lname)] = dict(
                logits=torch.cat(logits, dim=1), prefill_bytes=prefill_bytes, bytes_read=report.bytes_read,
                param_bytes=parameter_bytes(model), same_hidden=same_hidden,
                shapes={n: tuple(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())})
    for cname, lname in ENGINE_CASES:
        cls = RankZeroModel if rank == 0 else hylm.model.NemotronHModel
        model, _ = load_parallel_model(work / cname, layout(lname, rank), comm, model_class=cls)
        if rank == 0:
            model.attach(comm)
            results[("engine", cname, lname)] = run_staggered(model, prompts(cname), GREEDY, **ENGINE)[0]
            model.stop_ranks()
        else:
            serve_rank_zero(model, comm)
    torch.save(results, work / f"rank{rank}.pt")
    leave_group()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("parallel")
    g = torch.Generator().manual_seed(5)
    inputs = {}
    for i, name in enumerate(CONFIGS):
        # NVIDIA's layout (one tensor per expert) for one, stacked experts for the other: both loader paths
        save_hf_checkpoint(make_model(name), work / name, nvidia_layout=i == 0)
        v = CONFIGS[name].vocab_size
        inputs[name] = (torch.randint(3, v, (BATCH, PREFILL), generator=g),
                        torch.randint(3, v, (DECODE_STEPS, BATCH), generator=g))
    torch.save(inputs, work / "inputs.pt")
    mp.spawn(_rank_main, args=(free_port(), str(work)), nprocs=WORLD, join=True)
    ranks = [torch.load(work / f"rank{r}.pt") for r in range(WORLD)]
    return work, inputs, ranks


def single_process_logits(work: Path, name: str, inputs) -> torch.Tensor:
    model = hylm.load_model(work / name)
    prefill, decode = inputs[name]
    cache = model.new_cache(BATCH)
    with torch.no_grad():
        out = [model(prefill, cache)] + [model(step[:, None], cache) for step in decode]
    return torch.cat(out, dim=1)  # [B, T + steps, V]


@pytest.mark.parametrize("lname", list(LAYOUTS))
@pytest.mark.parametrize("cname", list(CONFIGS))
def test_logits_equal_single_process(run, cname, lname):
    work, inputs, ranks = run
    ref = single_process_logits(work, cname, inputs)
    got = ranks[0][(cname, lname)]["logits"]
    assert got.shape == ref.shape
    # split GEMMs sum in another order: fp32 rounding, measured against the logits' scale (up to ~15 here)
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-5 * scale, f"max abs logit error {err:.3g} for logits up to {scale:.3g}"
    assert all(r[(cname, lname)]["same_hidden"] for r in ranks), "ranks disagree on the hidden states"


@pytest.mark.parametrize("cname,lname", ENGINE_CASES)
def test_greedy_generation_through_engine_is_identical(run, cname, lname):
    work, _, ranks = run
    ref, _ = run_staggered(hylm.load_model(work / cname), prompts(cname), GREEDY, **ENGINE)
    assert ranks[0][("engine", cname, lname)] == ref


def _split(size: int, parts: int, rank: int) -> int:
    return size // parts + (rank < size % parts)


def claimed_shape(name: str, full: tuple[int, ...], cfg, tp: int, ep: int, rank: int) -> tuple[int, ...]:
    """What each rank holds, restated from the architecture: heads, groups, channels, experts, vocab."""
    if name in ("model.embeddings.weight", "lm_head.weight"):
        return (_split(cfg.vocab_size, tp, rank), full[1]) if tp > 1 else full
    if ".mixer." not in name:
        return full  # norms
    kind = cfg.pattern[int(name.split(".")[2])]
    param = name.split(".mixer.")[1]
    d = cfg.hidden_size
    if kind == MOE and param.startswith("experts."):
        if ep > 1:
            return (_split(cfg.n_routed_experts, ep, rank),) + full[1:]
        i = _split(cfg.moe_intermediate_size, tp, rank)
        return (full[0], i, full[2]) if param.endswith("up_proj") else (full[0], full[1], i)
    if tp == 1 or param.endswith("out_proj.bias") or param.endswith("o_proj.bias") or param.endswith("down_proj.bias"):
        return full  # replicated, or a row-parallel bias (zeros on ranks but 0)
    if kind == MOE and not param.startswith("shared_experts."):
        return full  # router, latent projections
    if kind in (MLP, MOE):
        size = cfg.intermediate_size if kind == MLP else cfg.moe_shared_expert_intermediate_size
        i = _split(size, tp, rank)
        return (i,) + full[1:] if ".up_proj." in name else (d, i)
    if kind == ATTENTION:
        hd = cfg.head_dim
        q, kv = cfg.num_attention_heads // tp * hd, max(1, cfg.num_key_value_heads // tp) * hd  # kv: >= 1 head
        proj = param.split(".")[0]
        return (d, q) if proj == "o_proj" else ({"q_proj": q, "k_proj": kv, "v_proj": kv}[proj],) + full[1:]
    assert kind == MAMBA
    h, p, n = cfg.mamba_num_heads // tp, cfg.mamba_head_dim, cfg.ssm_state_size
    g = cfg.n_groups // tp if cfg.n_groups >= tp else 1  # whole groups, or the one shared group
    return {"in_proj.weight": (2 * h * p + 2 * g * n + h, d), "in_proj.bias": (2 * h * p + 2 * g * n + h,),
            "conv1d.weight": (h * p + 2 * g * n, 1, cfg.conv_kernel), "conv1d.bias": (h * p + 2 * g * n,),
            "dt_bias": (h,), "A_log": (h,), "D": (h,), "norm.weight": (h * p,), "out_proj.weight": (d, h * p)}[param]


@pytest.mark.parametrize("lname", list(LAYOUTS))
@pytest.mark.parametrize("cname", list(CONFIGS))
def test_memory_per_rank_split_as_claimed(run, cname, lname):
    work, _, ranks = run
    full = hylm.load_model(work / cname)
    cfg = full.config
    full_shapes = {n: tuple(t.shape) for n, t in list(full.named_parameters()) + list(full.named_buffers())}
    tp, ep, _ = LAYOUTS[lname]
    tp, ep = (WORLD if tp > 1 else 1), (WORLD if ep > 1 else 1)
    for rank, res in enumerate(ranks):
        shapes = res[(cname, lname)]["shapes"]
        assert set(shapes) == set(full_shapes)
        for name, shape in shapes.items():
            assert shape == claimed_shape(name, full_shapes[name], cfg, tp, ep, rank), name
    held = [r[(cname, lname)]["param_bytes"] for r in ranks]
    experts = sum(t.numel() * 4 for n, t in full.named_parameters() if ".experts." in n)
    total = parameter_bytes(full)
    # the routed experts (most of a MoE model) are split exactly in two in every layout
    per_rank_experts = [sum(math.prod(s) * 4 for n, s in r[(cname, lname)]["shapes"].items() if ".experts." in n)
                        for r in ranks]
    assert sum(per_rank_experts) == experts and max(per_rank_experts) - min(per_rank_experts) <= experts // 4
    assert all(h < total for h in held)
    if tp > 1:  # tensor parallel: everything but norms, router, latent projections, shared kv/B/C is split
        assert max(held) < 0.62 * total, (held, total)


@pytest.mark.parametrize("cname", list(CONFIGS))
def test_loader_reads_only_the_ranks_shards(run, cname):
    work, _, ranks = run
    checkpoint = (work / cname / "model.safetensors").stat().st_size
    for lname in LAYOUTS:
        for rank, res in enumerate(ranks):
            r = res[(cname, lname)]
            assert r["bytes_read"] <= r["param_bytes"]  # nothing beyond the shard (zero biases: not read)
            if rank == 0:
                assert r["bytes_read"] == r["param_bytes"]
            assert r["bytes_read"] < checkpoint


@pytest.mark.parametrize("cname", list(CONFIGS))
def test_collectives_move_the_claimed_bytes(run, cname):
    """Counted from the tensors handed to the collectives during one prefill of N tokens (fp32)."""
    _, _, ranks = run
    cfg = CONFIGS[cname]
    n, d, f32 = BATCH * PREFILL, cfg.hidden_size, 4
    n_moe = cfg.pattern.count(MOE)
    latent = cfg.moe_latent_size or d
    got = {lname: ranks[0][(cname, lname)]["prefill_bytes"] for lname in LAYOUTS}
    # expert parallel alone: one all-reduce per MoE layer, of latent-size vectors (hidden-size without latent)
    assert got["ep"] == {"all_reduce": n_moe * n * latent * f32}
    assert got["ep_hidden_combine"] == {"all_reduce": n_moe * n * d * f32}
    # tensor parallel: the embedding and every block output, hidden-size; the Mamba gated norm's statistics
    # when its group spans both ranks; rank 0 gathers the other rank's half of the vocabulary
    norm_split = cfg.pattern.count(MAMBA) * n * cfg.n_groups * f32 if cfg.n_groups < WORLD else 0
    tp_reduce = (1 + cfg.num_hidden_layers) * n * d * f32 + norm_split
    gather = n * math.ceil(cfg.vocab_size / WORLD) * f32
    assert got["tp"] == {"all_reduce": tp_reduce, "gather": gather}
    assert got["tp_ep"] == got["tp"]  # the routed partial sums ride on the block's one all-reduce


def _hylm(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(hylm.__file__).parent.parent))
    return subprocess.Popen([sys.executable, *launcher, "-m", "hylm.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _generated_ids(proc: subprocess.Popen) -> list[int]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return [int(t) for t in out.split()]


PROMPT = [5, 6, 7, 8, 9, 10, 11]
GENERATE = ("--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens", "8", "--ignore-eos", "--no-stream")


def _reference_ids(model_dir: Path) -> list[int]:
    from hylm.engine.llm import LLM

    return LLM(hylm.load_model(model_dir)).generate(PROMPT, GREEDY)[0].outputs[0].token_ids


def test_cli_generate_spawns_its_own_ranks(run):
    work, _, _ = run
    got = _generated_ids(_hylm("generate", str(work / "latent"), *GENERATE, "--tensor-parallel-size", "2",
                               "--expert-parallel"))
    assert got == _reference_ids(work / "latent")


def test_cli_generate_under_torchrun_on_two_nodes(run):
    """Two torchrun agents with node ranks 0 and 1, as on two machines (here both on 127.0.0.1)."""
    work, _, _ = run
    port = str(free_port())
    nodes = [_hylm("generate", str(work / "plain"), *GENERATE, "--expert-parallel-size", "2",
                   launcher=("-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                             "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", port))
             for r in (1, 0)]
    assert _generated_ids(nodes[0]) == []  # rank 1 prints nothing: rank 0 runs the engine
    assert _generated_ids(nodes[1]) == _reference_ids(work / "plain")


def test_rank_zero_model_refuses_what_its_ranks_would_not_mirror():
    """Prefix caching copies states inside rank 0's pool only; the MTP block is not split: both refused."""
    from hylm.engine.engine import EngineConfig, LLMEngine
    from hylm.parallel import build_local_model
    from hylm.parallel.group import Communicator

    cfg = CONFIGS["latent"].replace(num_nextn_predict_layers=1, mtp_pattern="*E")
    model = build_local_model(cfg, layout("tp", 0), Communicator(0, WORLD, torch.device("cpu")), RankZeroModel)
    with pytest.raises(ValueError, match="prefix caching"):
        LLMEngine(model, EngineConfig(enable_prefix_caching=True, max_model_len=64))
    with pytest.raises(ValueError, match="no MTP block"):
        LLMEngine(model, EngineConfig(speculative_tokens=2, max_model_len=64))
    with pytest.raises(RuntimeError, match="not attached"):
        model.hidden_states(torch.tensor([5]), hylm.model.Batch.uniform(1, 1))


@pytest.mark.parametrize("tp,ep,message", [(3, 1, "num_attention_heads=4 is not divisible"),
                                           (2, 4, "must be 1 or equal"),
                                           (1, 16, "fewer than the 16 expert-parallel ranks")])
def test_layouts_that_cannot_be_exact_are_refused(tp, ep, message):
    from hylm.parallel import local_config

    with pytest.raises(ValueError, match=message):
        local_config(CONFIGS["latent"], ParallelLayout.from_sizes(tp, ep))
