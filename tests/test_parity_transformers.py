"""fp32 parity with transformers' NemotronHForCausalLM on tiny random models (tests/hf_models.py).

Every check goes through `hylm.load_model(checkpoint_dir)`: transformers' own save_pretrained output,
transformers v5's in-memory layout (`model.`, stacked experts) and NVIDIA's release layout (`backbone.`,
per-expert tensors, sharded, legacy config keys). Tolerance: max |hylm - ref| / max |ref| <= 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import hylm  # noqa: E402
from hylm.model.batch import Batch  # noqa: E402

from hf_models import CONFIGS, read_checkpoint, rel_err, seq_lens  # noqa: E402

TOL = 1e-4
NAMES = sorted(CONFIGS)
LAYOUTS = ("hf", "v5", "nvidia")


@pytest.fixture(scope="module")
def load(hf_checkpoints):
    """load(name, layout="hf") -> (HFCheckpoint, hylm model loaded from that layout's directory)."""
    loaded = {}

    def get(name: str, layout: str = "hf"):
        ck = hf_checkpoints(name)
        if (name, layout) not in loaded:
            loaded[name, layout] = hylm.load_model(ck.dirs[layout], dtype=torch.float32, device="cpu")
        return ck, loaded[name, layout]

    return get


def _ids(ck, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, ck.kwargs["vocab_size"], (batch, length), generator=g)


def _hf_logits(ck, ids: torch.Tensor) -> torch.Tensor:
    return ck.model(ids).logits.float()


def _long_len(ck) -> int:
    return 3 * ck.kwargs["chunk_size"] + 4  # several chunks, not a multiple of chunk_size


# ---- the checkpoints really are in the layouts the tests claim ---------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_layouts(hf_checkpoints, name):
    ck = hf_checkpoints(name)
    n_experts = ck.kwargs["n_routed_experts"]
    moe_layer = ck.kwargs["layers_block_type"].index("moe")

    v5 = read_checkpoint(ck.dirs["v5"])
    assert all(n.startswith(("model.", "lm_head.")) for n in v5)
    assert v5[f"model.layers.{moe_layer}.mixer.experts.up_proj"].shape[0] == n_experts
    assert "layers_block_type" in json.loads((ck.dirs["v5"] / "config.json").read_text())

    nv_dir = ck.dirs["nvidia"]
    index = json.loads((nv_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not (nv_dir / "model.safetensors").exists()
    nv = read_checkpoint(nv_dir)
    assert set(nv) == set(index["weight_map"])
    assert all(n.startswith(("backbone.", "lm_head.")) for n in nv)
    assert not any(n.endswith(("experts.up_proj", "experts.down_proj")) for n in nv)
    stacked = v5[f"model.layers.{moe_layer}.mixer.experts.up_proj"]  # [E, I, D_in]
    for e in range(n_experts):
        assert torch.equal(nv[f"backbone.layers.{moe_layer}.mixer.experts.{e}.up_proj.weight"], stacked[e])
    cfg = json.loads((nv_dir / "config.json").read_text())
    assert "layers_block_type" not in cfg and "n_groups" not in cfg and "chunk_size" not in cfg
    assert cfg["mamba_n_groups"] == ck.kwargs["n_groups"]
    assert cfg["mamba_chunk_size"] == ck.kwargs["chunk_size"]
    assert len(cfg["hybrid_override_pattern"]) == len(ck.kwargs["layers_block_type"])


# ---- prefill: one forward over whole sequences -----------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_prefill_parity(load, name, layout):
    ck, model = load(name, layout)
    for i, length in enumerate(seq_lens(ck.kwargs)):  # one not a multiple of chunk_size, one that is
        ids = _ids(ck, 2, length, seed=10 + i)
        ref = _hf_logits(ck, ids)
        out = model(ids)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        err = rel_err(out, ref)
        assert err <= TOL, f"{name}/{layout} T={length}: relative error {err:.3g}"


# ---- cached paths ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_decode_after_prefill(load, name):
    """Prefill k tokens into the cache, then one token at a time: equals the full forward, and equals
    transformers' own cached (prefill + one-token) path step by step."""
    ck, model = load(name)
    length, k = _long_len(ck), 7
    ids = _ids(ck, 2, length, seed=20)
    full = model(ids)
    ref = _hf_logits(ck, ids)
    assert rel_err(full, ref) <= TOL

    cache = model.new_cache(2)
    pieces = [model(ids[:, :k], cache=cache)]
    for t in range(k, length):
        pieces.append(model(ids[:, t:t + 1], cache=cache))
    stepped = torch.cat(pieces, dim=1)
    assert cache.lengths == [length, length]
    err_full = rel_err(stepped, full)
    err_ref = rel_err(stepped, ref)
    assert err_full <= TOL, f"decode vs full forward: {err_full:.3g}"
    assert err_ref <= TOL, f"decode vs transformers full forward: {err_ref:.3g}"

    out = ck.model(ids[:, :k], use_cache=True)
    hf_pieces, pkv = [out.logits.float()], out.past_key_values
    for t in range(k, length):
        out = ck.model(ids[:, t:t + 1], past_key_values=pkv, use_cache=True)
        hf_pieces.append(out.logits.float())
        pkv = out.past_key_values
    hf_stepped = torch.cat(hf_pieces, dim=1)
    err_hf = rel_err(stepped, hf_stepped)
    assert err_hf <= TOL, f"decode vs transformers' cached decode: {err_hf:.3g}"


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_split_prefill(load, name):
    """A prefill cut at arbitrary points (not chunk multiples) through the cache equals one shot."""
    ck, model = load(name)
    length = _long_len(ck) + 3
    ids = _ids(ck, 2, length, seed=30)
    full = model(ids)
    assert rel_err(full, _hf_logits(ck, ids)) <= TOL
    for cuts in ([5, 1, 7], [ck.kwargs["chunk_size"], 1, ck.kwargs["chunk_size"] + 1], [1, 1, 2]):
        cache = model.new_cache(2)
        pieces, start = [], 0
        for n in cuts + [length - sum(cuts)]:
            pieces.append(model(ids[:, start:start + n], cache=cache))
            start += n
        err = rel_err(torch.cat(pieces, dim=1), full)
        assert err <= TOL, f"split {cuts}: {err:.3g}"


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_packed_varlen(load, name):
    """Three sequences of different lengths packed into one Batch equal each sequence run alone; then a
    second packed step that continues all three from their states (1 / several / several new tokens)."""
    ck, model = load(name)
    q = ck.kwargs["chunk_size"]
    lens, more = [7, 2 * q, q + 3], [1, 6, q + 1]
    slots = [2, 0, 1]  # a permutation, so a slot mix-up cannot pass
    seqs = [_ids(ck, 1, n + m, seed=40 + i)[0] for i, (n, m) in enumerate(zip(lens, more))]
    alone = [model(s[None])[0] for s in seqs]
    for s, a in zip(seqs, alone):
        assert rel_err(a, _hf_logits(ck, s[None])[0]) <= TOL

    state = model.new_cache(3)
    first = model.forward_packed(torch.cat([s[:n] for s, n in zip(seqs, lens)]),
                                 Batch(lens, [0, 0, 0], slots), state)
    second = model.forward_packed(torch.cat([s[n:] for s, n in zip(seqs, lens)]),
                                  Batch(more, lens, slots), state)
    o1 = o2 = 0
    for i, (n, m) in enumerate(zip(lens, more)):
        err1 = rel_err(first[o1:o1 + n], alone[i][:n])
        err2 = rel_err(second[o2:o2 + m], alone[i][n:])
        assert err1 <= TOL, f"packed prefill, sequence {i}: {err1:.3g}"
        assert err2 <= TOL, f"packed continuation, sequence {i}: {err2:.3g}"
        o1, o2 = o1 + n, o2 + m


# ---- end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_greedy_matches_generate(load, name):
    """hylm's greedy tokens (prefill, then cached decode) equal transformers' generate(do_sample=False)."""
    ck, model = load(name, "nvidia")
    steps = 10
    prompt = _ids(ck, 2, 9, seed=50)
    expected = ck.model.generate(prompt, max_new_tokens=steps, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[:, prompt.shape[1]:]
    cache = model.new_cache(2)
    x, got = prompt, []
    for _ in range(steps):
        x = model(x, cache=cache)[:, -1].argmax(-1, keepdim=True)
        got.append(x)
    assert torch.equal(torch.cat(got, dim=1), expected)
