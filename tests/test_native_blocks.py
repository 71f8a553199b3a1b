"""Whole blocks in one native call (hylm/ops/csrc/moe_rows.c, decode_blocks.c): the MoE layer against a float64
loop over tokens (routing, chosen experts, latent projections, shared expert written out by hand), with row- and
column-major projection weights, odd sizes, with and without latent projections and a shared expert, with the
block's norm and residual; the attention block against its PyTorch composition over a paged cache (scattered
blocks, several tokens per sequence); RMSNorm rows; the model's blocks and engine outputs with and without them
(greedy tokens, logprobs, speculative decoding)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hylm.model import fused
from hylm.model import moe as moe_model
from hylm.ops import decode_blocks
from hylm.ops import moe as moe_ops
from hylm.ops import native

from engine_models import TINY, assert_runs_agree, logprob_runs, make_agreeable, random_prompts, tiny_model

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler: the native CPU kernels are not built")


def loop_reference(x, router, bias, top_k, normalize, scaling, up, down, fc1, fc2, shared_up, shared_down):
    """float64, one token at a time."""
    x, router = x.double(), router.double()
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for r in range(x.shape[0]):
        scores = [1.0 / (1.0 + torch.exp(-(router[e] @ x[r])).item()) for e in range(router.shape[0])]
        choice = [s + (float(bias[e]) if bias is not None else 0.0) for e, s in enumerate(scores)]
        ids = sorted(range(len(scores)), key=lambda e: -choice[e])[:top_k]
        w = [scores[e] for e in ids]
        if normalize:
            w = [v / (sum(w) + 1e-20) for v in w]
        h = fc1.double() @ x[r] if fc1 is not None else x[r]
        y = sum(wj * scaling * (down[e].double() @ torch.relu(up[e].double() @ h) ** 2) for wj, e in zip(w, ids))
        out[r] = fc2.double() @ y if fc2 is not None else y
        if shared_up is not None:
            out[r] += shared_down.double() @ torch.relu(shared_up.double() @ x[r]) ** 2
    return out


def case(rows, d, e, k, inter, latent, shared, column_major, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def weight(out_f, in_f):  # a Linear weight, stored as the CPU loader stores it when column_major
        w = rnd(out_f, in_f, scale=in_f ** -0.5)
        return w.t().contiguous().t() if column_major else w

    lat = latent or d
    return dict(
        x=rnd(rows, d), router=rnd(e, d, scale=d ** -0.5), bias=rnd(e, scale=0.1), top_k=k,
        up=rnd(e, inter, lat, scale=lat ** -0.5), down=rnd(e, lat, inter, scale=inter ** -0.5),
        fc1=weight(latent, d) if latent else None, fc2=weight(d, latent) if latent else None,
        shared_up=weight(shared, d) if shared else None, shared_down=weight(d, shared) if shared else None)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 37])
@pytest.mark.parametrize("shape", [
    # d, experts, top_k, expert size, latent, shared, column-major projections
    (64, 8, 2, 32, 24, 48, True),  # engine tests' shape
    (192, 8, 2, 96, 96, 384, True),  # hylm-tiny's MoE
    (36, 5, 3, 7, None, 20, False),  # odd sizes: no tile fits, no latent projection
    (40, 6, 6, 12, 16, None, False),  # every expert chosen, no shared expert
    (48, 16, 1, 33, 20, 50, True),
])
@pytest.mark.parametrize("normalize,scaling", [(True, 2.5), (False, 1.0)])
def test_native_moe_matches_float64_loop(rows, shape, normalize, scaling):
    d, e, k, inter, latent, shared, colmajor = shape
    c = case(rows, d, e, k, inter, latent, shared, colmajor, seed=rows * 31 + d)
    args = (c["x"], c["router"], c["bias"], k, normalize, scaling, c["up"], c["down"], c["fc1"], c["fc2"],
            c["shared_up"], c["shared_down"])
    want = loop_reference(*args)
    names = dict(fc1=c["fc1"], fc2=c["fc2"], shared_up=c["shared_up"], shared_down=c["shared_down"])
    assert moe_ops.native_moe_ok(c["x"], c["router"], c["up"], c["down"], **names)
    got = moe_ops.native_moe_rows(c["x"], c["router"], c["bias"], k, normalize, scaling, c["up"], c["down"], **names)
    assert got.shape == (rows, d) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # the PyTorch composition the model runs elsewhere agrees with the same loop
    torch.testing.assert_close(moe_ops.moe_reference(*args).double(), want, rtol=1e-4, atol=1e-5)


def test_native_moe_refuses_what_it_cannot_run():
    c = case(2, 64, 8, 2, 32, 24, 48, True, seed=1)
    w = dict(fc1=c["fc1"], fc2=c["fc2"], shared_up=c["shared_up"], shared_down=c["shared_down"])
    x = c["x"]
    assert moe_ops.native_moe_ok(x, c["router"], c["up"], c["down"], **w)
    too_many = torch.randn(moe_ops.NATIVE_MAX_ROWS + 1, 64)
    assert not moe_ops.native_moe_ok(too_many, c["router"], c["up"], c["down"], **w)
    assert not moe_ops.native_moe_ok(x, c["router"], c["up"], c["down"], n_group=2, **w)  # grouped routing
    assert not moe_ops.native_moe_ok(x.double(), c["router"], c["up"], c["down"], **w)
    assert not moe_ops.native_moe_ok(x, c["router"], c["up"].transpose(1, 2), c["down"], **w)  # experts strided
    up = c["up"].clone().requires_grad_()
    assert not moe_ops.native_moe_ok(x, c["router"], up, c["down"], **w)  # autograd wants the torch path
    with pytest.raises(RuntimeError, match="refused"):  # a latent size that disagrees with the projections
        moe_ops.native_moe_rows(x, c["router"], None, 2, True, 1.0, c["up"][:, :, :8].contiguous(),
                                c["down"][:, :8].contiguous(), fc1=None, fc2=None)


def test_native_moe_block_adds_norm_and_residual():
    c = case(3, 64, 8, 2, 32, 24, 48, True, seed=5)
    norm_w = torch.randn(64) * 0.5 + 1.0
    eps = 1e-5
    args = (c["router"], c["bias"], 2, True, 2.0, c["up"], c["down"], c["fc1"], c["fc2"], c["shared_up"],
            c["shared_down"])
    plan = moe_ops.prepare_native_moe(*args, norm_weight=norm_w, eps=eps)
    x = c["x"]
    xn = decode_blocks.rmsnorm_reference(x.double(), norm_w.double(), eps)
    want = x.double() + loop_reference(xn, *args)
    torch.testing.assert_close(plan(x, residual=True).double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_native_rmsnorm_rows(rows):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 52, generator=g) * 3, torch.randn(52, generator=g)
    assert decode_blocks.native_rmsnorm_ok(x, w)
    torch.testing.assert_close(decode_blocks.rmsnorm_rows(x, w, 1e-5).double(),
                               decode_blocks.rmsnorm_reference(x.double(), w.double(), 1e-5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group,head_dim,column_major", [(2, 16, True), (4, 48, False), (1, 64, True)])
@pytest.mark.parametrize("tokens_per_seq", [1, 3])
def test_native_attention_block_matches_pytorch(group, head_dim, column_major, tokens_per_seq):
    """Three sequences with 5, 17 and 40 tokens of context in scattered blocks of 4; each new token is stored,
    then attends to its sequence's positions up to its own."""
    g = torch.Generator().manual_seed(group * 100 + head_dim + tokens_per_seq)
    d, kv_heads, bs = 40, 2, 4
    heads = kv_heads * group

    def weight(o, i):
        w = torch.randn(o, i, generator=g) * i ** -0.5
        return w.t().contiguous().t() if column_major else w

    wq, wk, wv, wo = weight(heads * head_dim, d), weight(kv_heads * head_dim, d), weight(kv_heads * head_dim, d), \
        weight(d, heads * head_dim)
    norm_w = torch.randn(d, generator=g) * 0.3 + 1
    contexts, blocks = [5, 17, 40], 40
    perm = torch.randperm(blocks, generator=g).tolist()
    tables_seq, at = [], 0
    for ctx in contexts:
        nb = -(-(ctx + tokens_per_seq) // bs)
        tables_seq.append(perm[at: at + nb])
        at += nb
    width = max(map(len, tables_seq))
    tables, lengths, new_rows = [], [], []
    for tab, ctx in zip(tables_seq, contexts):
        for j in range(tokens_per_seq):
            p = ctx + j
            tables.append(tab + [0] * (width - len(tab)))
            lengths.append(p + 1)
            new_rows.append(tab[p // bs] * bs + p % bs)
    tables, lengths, new_rows = (torch.tensor(v, dtype=torch.long) for v in (tables, lengths, new_rows))
    k_cache = torch.randn(kv_heads, blocks * bs, head_dim, generator=g)
    v_cache = torch.randn(kv_heads, blocks * bs, head_dim, generator=g)
    x = torch.randn(len(lengths), d, generator=g)
    scale = head_dim ** -0.5
    kc2, vc2 = k_cache.clone(), v_cache.clone()
    want = decode_blocks.attention_block_reference(x, norm_w, 1e-5, wq, wk, wv, wo, heads, kv_heads, head_dim, scale,
                                                   kc2, vc2, new_rows, tables, lengths, bs)
    plan = decode_blocks.prepare_native_attention(norm_w, 1e-5, wq, wk, wv, wo, heads, kv_heads, head_dim, scale)
    got = plan(x, k_cache, v_cache, new_rows, tables, lengths, bs, int(lengths.max()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k_cache, kc2, rtol=1e-5, atol=1e-6)  # the new keys and values were stored
    torch.testing.assert_close(v_cache, vc2, rtol=1e-5, atol=1e-6)


UNGROUPED = dataclasses.replace(TINY, n_group=1, topk_group=1)


def count_calls(monkeypatch) -> list[str]:
    """Names of the native block kernels called from now on ("moe", "attention", "mamba")."""
    from hylm.ops.mamba_step import NativeMambaBlock

    calls: list[str] = []

    def counting(original, name):
        return lambda self, *a, **k: calls.append(name) or original(self, *a, **k)

    for cls, name in ((moe_ops.NativeMoE, "moe"), (decode_blocks.NativeAttention, "attention"),
                      (NativeMambaBlock, "mamba")):
        monkeypatch.setattr(cls, "run", counting(cls.run, name))
    return calls


def test_model_moe_layer_with_and_without_native_kernel(monkeypatch):
    model = tiny_model(seed=3, config=UNGROUPED)
    layer = next(m for m in model.modules() if isinstance(m, moe_model.MoE))
    calls = count_calls(monkeypatch)
    for rows in (1, 4, 8, 40, fused.MAX_ROWS + 1):
        x = torch.randn(rows, UNGROUPED.hidden_size, generator=torch.Generator().manual_seed(rows))
        with torch.inference_mode():
            calls.clear()
            got = layer(x)
            assert len(calls) == (rows <= fused.MAX_ROWS)
            monkeypatch.setattr(fused, "enabled", False)
            want = layer(x)
            monkeypatch.setattr(fused, "enabled", True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a copy of a model that has prepared plans prepares its own (plans point at the original's tensors)
    import copy
    twin = copy.deepcopy(layer)
    with torch.inference_mode():
        x = torch.randn(2, UNGROUPED.hidden_size)
        torch.testing.assert_close(twin(x), layer(x))
        twin.experts.up_proj.zero_()
        assert not torch.allclose(twin(x), layer(x))
    # weights replaced after the first call (as loading or quantizing does): the plan is rebuilt from the new ones
    with torch.inference_mode():
        x = torch.randn(2, UNGROUPED.hidden_size)
        layer.experts.up_proj.data = layer.experts.up_proj.data * 2
        got = layer(x)
        monkeypatch.setattr(fused, "enabled", False)
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(fused, "enabled", True)
    # a new Parameter, a swapped module, and a module the kernel can't compute (a bias): each is seen at the next
    # call (the list of tensors a plan reads is collected again after any assignment)
    from torch import nn

    def swap_down(layer):
        layer.experts.down_proj = nn.Parameter(torch.randn_like(layer.experts.down_proj) * 0.1)

    def swap_latent(layer):
        old = layer.fc2_latent_proj
        layer.fc2_latent_proj = nn.Linear(old.in_features, old.out_features, bias=False)

    def biased_latent(layer):
        old = layer.fc1_latent_proj
        layer.fc1_latent_proj = nn.Linear(old.in_features, old.out_features, bias=True)

    for change, native in ((swap_down, True), (swap_latent, True), (biased_latent, False)):
        with torch.inference_mode():
            x = torch.randn(3, UNGROUPED.hidden_size)
            before = layer(x)
            change(layer)
            calls.clear()
            got = layer(x)
            assert len(calls) == native and not torch.allclose(got, before)
            monkeypatch.setattr(fused, "enabled", False)
            torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
            monkeypatch.setattr(fused, "enabled", True)


@pytest.mark.parametrize("spec", [0, 3])
def test_engine_outputs_with_and_without_native_blocks(monkeypatch, spec):
    """Greedy tokens and logprobs of staggered requests (decode steps, multi-token chunks over short contexts,
    speculative verification and MTP drafts when spec > 0) equal the PyTorch paths'."""
    from hylm.engine.sampling_params import SamplingParams

    model = tiny_model(seed=4, config=dataclasses.replace(UNGROUPED, num_nextn_predict_layers=1 if spec else 0,
                                                                 mtp_pattern="*E" if spec else ""))
    prompts = random_prompts(5, 3, 40, seed=33)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    calls = count_calls(monkeypatch)

    def run():
        return logprob_runs(model, prompts, params, block_size=4, max_num_batched_tokens=16, speculative_tokens=spec)

    with_native = run()
    assert {"moe", "attention", "mamba"} <= set(calls)
    monkeypatch.setattr(fused, "enabled", False)
    calls.clear()
    without = run()
    assert not calls
    assert_runs_agree(with_native, without)


@pytest.mark.parametrize("tokens", [1, 3])
def test_model_forward_chains_native_blocks_and_follows_parameter_changes(monkeypatch, tokens):
    """One decode token (or 3 verified tokens with states kept) through the whole model: every block with a native
    kernel runs it (the MLP block its PyTorch forward in between), hidden states and Mamba states equal the
    PyTorch paths', and a parameter updated in place or replaced is read by the next forward."""
    from hylm.engine.engine import EngineConfig, LLMEngine
    from hylm.engine.sampling_params import SamplingParams
    from hylm.model import Batch
    from hylm.model.mamba2 import Mamba2Mixer

    model = tiny_model(seed=5, config=UNGROUPED)  # Mamba, MoE, attention and one MLP block
    engine = LLMEngine(model, EngineConfig(max_num_seqs=2, max_model_len=64, block_size=4))
    engine.add_request(random_prompts(1, 9, 10, seed=8)[0], SamplingParams(max_tokens=8))
    engine.step()  # the prompt
    r, pool = engine.scheduler.running[0], engine.pool
    assert pool.reserve(r.slot, r.num_computed + tokens)
    saved = pool.snapshot(r.slot)
    ids = torch.tensor([7, 8, 9][:tokens])
    calls = count_calls(monkeypatch)

    def forward(native: bool):
        pool.restore(r.slot, saved)
        monkeypatch.setattr(fused, "enabled", native)
        batch = Batch([tokens], [r.num_computed], [r.slot], keep_states=[tokens > 1])
        calls.clear()
        with torch.inference_mode():
            hidden = model.hidden_states(ids, batch, pool)
        kept = {layer: tuple(t.clone() for t in per_seq[0]) for layer, per_seq in batch.saved_states.items()}
        return hidden, pool.snapshot(r.slot), kept, list(calls)

    def agree(a, b):
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
        for part in (1, 2):
            assert a[part].keys() == b[part].keys()
            for layer in a[part]:
                for x, y in zip(a[part][layer], b[part][layer]):
                    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)

    kinds = {"M": "mamba", "E": "moe", "*": "attention"}
    before = forward(True)
    assert before[3] == [kinds[k] for k in model.config.pattern if k in kinds]
    assert len(before[2]) == (model.config.pattern.count("M") if tokens > 1 else 0)
    agree(before, forward(False))

    mamba = next(m for m in model.modules() if isinstance(m, Mamba2Mixer))
    moe = next(m for m in model.modules() if isinstance(m, moe_model.MoE))
    for change in (lambda: mamba.A_log.add_(0.5),  # in place, as an optimizer step
                   lambda: setattr(moe.experts.down_proj, "data", torch.randn_like(moe.experts.down_proj) * 0.3)):
        with torch.no_grad():
            change()
        after = forward(True)
        assert not torch.allclose(after[0], before[0])
        agree(after, forward(False))
        before = after


@pytest.mark.parametrize("k, min_confidence", [(1, 0.0), (3, 0.0), (3, 0.9965)])
def test_native_greedy_drafts_equal_step_by_step_drafts(monkeypatch, k, min_confidence):
    """The MTP draft loop in one native call (hylm/ops/mtp_draft.py) drafts the same tokens as the step-by-step
    path through the model's modules, for batches of requests at different positions (its key/value rows and block
    tables), also where drafting stops early below a confidence, and the engine's greedy output stays the plain
    one."""
    from hylm.engine import speculative
    from hylm.engine.sampling_params import SamplingParams
    from hylm.ops import mtp_draft

    # drafts often accepted, so catch-ups span several rows; with a weaker pull the MTP's confidence in its drafts
    # varies (0.91-1.0), so that some steps stop drafting early
    model = make_agreeable(tiny_model(seed=6, config=dataclasses.replace(UNGROUPED, num_nextn_predict_layers=1,
                                                                         mtp_pattern="*E")),
                           pull=4.5 if min_confidence else 6.0)
    prompts = random_prompts(4, 3, 30, seed=12)
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, logprobs=0)
    drafts: list = []
    original = speculative.draft
    planned = []  # each drafted request's planned count (r.spec_k) and its drafts' count

    def recorded(model, pool, reqs, *rest):
        drafts.append(original(model, pool, reqs, *rest))
        planned.extend((r.spec_k, len(d)) for r, (d, _) in zip(reqs, drafts[-1]))
        return drafts[-1]

    monkeypatch.setattr(speculative, "draft", recorded)
    native_calls = []  # each native call's catch-up rows per sequence
    kernel = mtp_draft.mtp_greedy
    monkeypatch.setattr("hylm.model.mtp.mtp_greedy",
                        lambda *a: native_calls.append([j - i for i, j in zip(a[2], a[2][1:])]) or kernel(*a))

    def run():
        drafts.clear()
        planned.clear()
        out = logprob_runs(model, prompts, params, block_size=4, max_num_batched_tokens=16, max_num_seqs=3,
                           speculative_tokens=k, speculative_min_confidence=min_confidence)
        return out, [d for step in drafts for d, _ in step]

    stepwise_calls = []
    stepwise_drafts = speculative._draft_stepwise
    monkeypatch.setattr(speculative, "_draft_stepwise", lambda *a: stepwise_calls.append(1) or stepwise_drafts(*a))
    native_out, native_drafts = run()
    # every step drafted natively, also those whose requests draft different numbers of tokens (near max_tokens)
    assert not stepwise_calls
    assert max(len(rows) for rows in native_calls) > 1  # several sequences at once
    assert max(max(rows) for rows in native_calls) > 1 if k > 1 else True  # drafts accepted: longer catch-ups
    monkeypatch.setattr(type(model.mtp), "greedy_drafts", lambda *a, **k: None)
    stepwise_out, stepwise_drafts = run()
    assert native_drafts == stepwise_drafts and len(native_drafts) > 10
    # below the confidence, some steps draft fewer tokens than planned (never none); otherwise all as planned
    assert all(1 <= n <= want for want, n in planned)
    assert any(n < want for want, n in planned) == bool(min_confidence)
    assert_runs_agree(native_out, stepwise_out)
    assert_runs_agree(native_out, logprob_runs(model, prompts, params, block_size=4, max_num_batched_tokens=16,
                                               max_num_seqs=3))


@pytest.mark.parametrize("steps", [1, 3])
def test_native_greedy_drafts_match_pytorch_modules(monkeypatch, steps):
    """The native catch-up + draft loop against the MTP's PyTorch modules step by step (fused kernels off): two
    sequences catching up over 3 and 2 positions (random hidden states and tokens) at different places of their
    paged caches, then steps - 1 more drafts each."""
    from hylm.engine.engine import EngineConfig, LLMEngine
    from hylm.engine.sampling_params import SamplingParams
    from hylm.model import Batch

    model = tiny_model(seed=7, config=dataclasses.replace(UNGROUPED, num_nextn_predict_layers=1, mtp_pattern="*E"))
    engine = LLMEngine(model, EngineConfig(max_num_seqs=2, max_model_len=64, block_size=4, speculative_tokens=3))
    for prompt in random_prompts(2, 9, 15, seed=3):
        engine.add_request(prompt, SamplingParams(max_tokens=8))
    engine.step()  # both prompts
    pool, reqs = engine.pool, engine.scheduler.running
    lens = [3, 2]
    starts = [r.num_computed - n for r, n in zip(reqs, lens)]
    for r in reqs:
        assert pool.reserve(r.slot, r.num_computed + steps)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, UNGROUPED.vocab_size, (sum(lens),), generator=g)
    hidden = torch.randn(sum(lens), UNGROUPED.hidden_size, generator=g)
    batch = Batch(lens, starts, [r.slot for r in reqs])
    embed, head = model.model.embeddings, model.lm_head

    def compare():
        with torch.inference_mode():
            native_prev = torch.empty(2, UNGROUPED.hidden_size)
            native = model.mtp.greedy_drafts(tokens, hidden, batch, steps, pool, embed, head, prev_out=native_prev)
            assert native is not None and native.shape == (2, steps)
            monkeypatch.setattr(fused, "enabled", False)
            prev = model.mtp(embed(tokens), hidden, batch, pool, rows=batch.last_token_rows())  # [2, D]
            reference, confidence = [], []  # per draft: [2] ids, and the larger of the two drafts' probabilities
            for s in range(steps):
                logits = model.logits(prev)  # [2, V]
                reference.append(logits.argmax(-1))
                confidence.append(float(torch.softmax(logits.double(), -1).amax()))
                if s + 1 < steps:
                    step = Batch([1, 1], [c + n + s for c, n in zip(starts, lens)], batch.slots)
                    prev = model.mtp(embed(reference[-1]), prev, step, pool)
            monkeypatch.setattr(fused, "enabled", True)
            reference = torch.stack(reference, 1).tolist()  # [2, steps]
            assert native.tolist() == reference
            torch.testing.assert_close(native_prev, prev, rtol=1e-5, atol=1e-5)
            # a confidence threshold: drafting stops at the first draft after the first that both sequences' MTP
            # gives less than it (thresholds halfway between the drafts' confidences, so rounding can't flip them)
            levels = sorted(set(confidence[1:]))
            for threshold in [(a + b) / 2 for a, b in zip([0.0] + levels, levels + [1.0])]:
                expected = next((s for s in range(1, steps) if confidence[s] < threshold), steps)
                stopped = model.mtp.greedy_drafts(tokens, hidden, batch, steps, pool, embed, head,
                                                  min_confidence=threshold)
                assert stopped.tolist() == [row[:expected] for row in reference]
        return native_prev

    before = compare()
    with torch.no_grad():  # the MTP's MoE changed in place, as by an optimizer step: the loop reads the new weights
        model.mtp.layers[1].mixer.experts.up_proj.mul_(1.5)
    assert not torch.allclose(compare(), before)


def test_native_greedy_drafts_refuse_positions_outside_the_tables():
    """A block table too short for the positions the loop would write is refused before anything is written."""
    import torch as t

    from hylm.ops import mtp_draft

    model = tiny_model(seed=7, config=dataclasses.replace(UNGROUPED, num_nextn_predict_layers=1, mtp_pattern="*E"))
    first, last = model.mtp.layers
    attention, moe = fused.block_plan(first), fused.block_plan(last)
    k_cache = t.zeros(UNGROUPED.num_key_value_heads, 8, UNGROUPED.head_dim)
    v_cache = t.zeros_like(k_cache)
    hidden, tokens = t.randn(2, UNGROUPED.hidden_size), t.tensor([3, 4])
    weights = (model.model.embeddings.weight, (first.enorm.weight, 1e-5), (first.hnorm.weight, 1e-5),
               first.eh_proj.weight, (last.final_layernorm.weight, 1e-5), model.lm_head.weight, attention, k_cache,
               v_cache)

    def drafts(start, table, block_size):  # 2 catch-up positions from `start`, then 2 more drafts: 4 positions
        return mtp_draft.mtp_greedy(tokens, hidden, [0, 2], [start], 3, *weights, t.tensor([table]), block_size, moe)

    with pytest.raises(RuntimeError, match="refused"):  # positions 5..8 need blocks 1 and 2 of size 4
        drafts(5, [0, 1], 4)
    with pytest.raises(RuntimeError, match="refused"):  # block 2 (rows 8..11) is past the cache's 8 rows
        drafts(5, [0, 1, 2], 4)
    assert not k_cache.any() and not v_cache.any()
    assert drafts(1, [3, 0, 1], 2).shape == (1, 3)  # positions 1..4: rows 7, 0, 1, 2
    written = k_cache.abs().sum((0, 2)) > 0  # [8] rows
    assert written.tolist() == [True, True, True, False, False, False, False, True]


def test_native_drafts_for_requests_drafting_different_numbers(monkeypatch):
    """Requests near their max_tokens draft fewer tokens than the others of their step: each group of equal K is
    drafted natively, and the outputs stay those of plain decoding."""
    from hylm.engine import speculative
    from hylm.engine.engine import EngineConfig, LLMEngine
    from hylm.engine.sampling_params import SamplingParams

    model = make_agreeable(tiny_model(seed=6, config=dataclasses.replace(UNGROUPED, num_nextn_predict_layers=1,
                                                                         mtp_pattern="*E")))
    prompts = random_prompts(2, 12, 12, seed=5)

    def run(k):
        eng = LLMEngine(model, EngineConfig(max_num_seqs=2, max_model_len=64, block_size=4, speculative_tokens=k))
        ids = [eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
               for p, n in zip(prompts, (7, 20))]
        out: dict = {}
        while eng.has_unfinished():
            for o in eng.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        return [out[i] for i in ids]

    mixed, stepwise = [], []
    original = speculative.draft
    monkeypatch.setattr(speculative, "draft", lambda m, p, reqs, *rest:
                        mixed.append(len({r.spec_k for r in reqs}) > 1) or original(m, p, reqs, *rest))
    stepwise_drafts = speculative._draft_stepwise
    monkeypatch.setattr(speculative, "_draft_stepwise", lambda *a: stepwise.append(1) or stepwise_drafts(*a))
    assert run(3) == run(0)
    assert any(mixed) and not stepwise
