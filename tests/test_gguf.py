"""GGUF (llama.cpp) import and export.

The reference files here are written by the tests themselves with the `gguf` package's writer, in the layout
llama.cpp's converter uses for `nemotron_h_moe` / `nemotron_h` (tensor names, transforms and keys spelled
out below, independently of hylm's layout module); reference weights come from `gguf.quants.dequantize`.
"""

import copy
import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hylm
from engine_models import tiny_model
from hylm.config import ModelConfig
from hylm.model.gguf_quant import Q8_0Experts, Q8_0Linear, dequantize_q8_0, q8_0_split_blocks
from hylm.model.moe import Experts
from hylm.weights import CheckpointError
from hylm.weights.gguf_quants import quantize as hylm_quantize

QT = gguf.GGMLQuantizationType

# Super-like: latent MoE, grouped routing, every row length a multiple of 32 (all Q8_0-able)
MOE_CFG = ModelConfig(vocab_size=96, hidden_size=64, pattern="M*EME", num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=2, chunk_size=8,
                      n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      moe_shared_expert_intermediate_size=64, moe_latent_size=32, n_group=2, topk_group=1,
                      routed_scaling_factor=2.0, eos_token_id=2, max_position_embeddings=4096)
# nemotron_h (no experts): dense squared-ReLU MLP layers
DENSE_CFG = MOE_CFG.replace(pattern="M*-M-", intermediate_size=96)
# rows of 256 for the k-quants
KQ_CFG = MOE_CFG.replace(vocab_size=64, hidden_size=256, pattern="M*E", head_dim=64, mamba_head_dim=64,
                         n_routed_experts=4, moe_intermediate_size=256, moe_shared_expert_intermediate_size=256,
                         moe_latent_size=256, n_group=1, topk_group=1)


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- an independent llama.cpp-layout writer ---------------------------------------------------------------

def llama_cpp_tensors(model) -> dict[str, np.ndarray]:
    """GGUF name -> fp32 array, as llama.cpp's convert_hf_to_gguf.py lays a Nemotron-H model out."""
    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embeddings.weight"], "output_norm.weight": sd["model.norm_f.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i, kind in enumerate(c.pattern):
        m, b = f"model.layers.{i}.mixer.", f"blk.{i}."
        out[b + "attn_norm.weight"] = sd[f"model.layers.{i}.norm.weight"]
        if kind == "M":
            out[b + "ssm_in.weight"] = sd[m + "in_proj.weight"]
            out[b + "ssm_conv1d.weight"] = sd[m + "conv1d.weight"][:, 0, :]  # [C, 1, K] squeezed
            out[b + "ssm_conv1d.bias"] = sd[m + "conv1d.bias"]
            out[b + "ssm_dt.bias"] = sd[m + "dt_bias"]
            out[b + "ssm_a"] = -np.exp(sd[m + "A_log"])[:, None]
            out[b + "ssm_d"] = sd[m + "D"][:, None]
            out[b + "ssm_norm.weight"] = sd[m + "norm.weight"].reshape(c.n_groups, -1)
            out[b + "ssm_out.weight"] = sd[m + "out_proj.weight"]
        elif kind == "*":
            for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                                 ("o_proj", "attn_output")):
                out[b + theirs + ".weight"] = sd[m + ours + ".weight"]
        elif kind == "E":
            out[b + "ffn_gate_inp.weight"] = sd[m + "gate.weight"]
            out[b + "exp_probs_b.bias"] = sd[m + "gate.e_score_correction_bias"]
            out[b + "ffn_up_exps.weight"] = sd[m + "experts.up_proj"]  # [E, I, D] stacked
            out[b + "ffn_down_exps.weight"] = sd[m + "experts.down_proj"]
            out[b + "ffn_up_shexp.weight"] = sd[m + "shared_experts.up_proj.weight"]
            out[b + "ffn_down_shexp.weight"] = sd[m + "shared_experts.down_proj.weight"]
            if c.moe_latent_size:
                out[b + "ffn_latent_down.weight"] = sd[m + "fc1_latent_proj.weight"]
                out[b + "ffn_latent_up.weight"] = sd[m + "fc2_latent_proj.weight"]
        else:
            out[b + "ffn_up.weight"] = sd[m + "up_proj.weight"]
            out[b + "ffn_down.weight"] = sd[m + "down_proj.weight"]
    return out


def keeps_f32(name: str, array: np.ndarray) -> bool:
    """llama.cpp's converter keeps these F32 whatever the output type."""
    return (array.ndim <= 1 or name.endswith("norm.weight") or not name.endswith(".weight")
            or name.endswith(("ssm_conv1d.weight", "ffn_gate_inp.weight")))


def encode(array: np.ndarray, qtype: QT) -> np.ndarray:
    if qtype in (QT.Q4_K, QT.Q5_K, QT.Q6_K):  # the gguf package has decoders but no encoders for these
        return hylm_quantize(array, qtype)
    return gguf.quants.quantize(array, qtype)


def write_reference_gguf(model, path, qtype: QT = QT.F32) -> dict[str, tuple[np.ndarray, QT]]:
    """Write `model` with gguf.GGUFWriter as llama.cpp's converter would; returns name -> (stored array, type)."""
    c = model.config
    arch = "nemotron_h_moe" if "E" in c.pattern else "nemotron_h"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(len(c.pattern))
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_vocab_size(c.vocab_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv([c.num_key_value_heads if k == "*" else 0 for k in c.pattern])
    w.add_feed_forward_length([c.moe_intermediate_size if k == "E" else c.intermediate_size if k == "-" else 0
                               for k in c.pattern])
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.layer_norm_epsilon)
    w.add_ssm_conv_kernel(c.conv_kernel)
    w.add_ssm_inner_size(c.mamba_num_heads * c.mamba_head_dim)
    w.add_ssm_state_size(c.ssm_state_size)
    w.add_ssm_time_step_rank(c.mamba_num_heads)
    w.add_ssm_group_count(c.n_groups)
    if "E" in c.pattern:
        w.add_expert_count(c.n_routed_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(c.moe_shared_expert_intermediate_size)
        w.add_expert_shared_count(1)
        w.add_expert_weights_norm(c.norm_topk_prob)
        w.add_expert_weights_scale(c.routed_scaling_factor)
        w.add_expert_group_count(c.n_group)
        w.add_expert_group_used_count(c.topk_group)
        if c.moe_latent_size:
            w.add_moe_latent_size(c.moe_latent_size)
    w.add_tokenizer_model("none")
    w.add_eos_token_id(2)
    stored = {}
    for name, array in llama_cpp_tensors(model).items():
        t = QT.F32 if keeps_f32(name, array) else qtype
        data = encode(np.ascontiguousarray(array, dtype=np.float32), t)
        w.add_tensor(name, data, raw_dtype=t if t not in (QT.F32, QT.F16) else None)
        stored[name] = (data, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def reference_model(model, stored):
    """A dense copy of `model` holding the weights gguf.quants.dequantize decodes from the stored tensors."""
    c = model.config
    ref = copy.deepcopy(model)
    dec = {n: torch.from_numpy(np.asarray(gguf.quants.dequantize(d, t), dtype=np.float32).copy())
           for n, (d, t) in stored.items()}
    sd = ref.state_dict()
    back = {v: k for k, v in _NAME_PAIRS(c).items()}
    for name, value in dec.items():
        param = back[name]
        if name.endswith("ssm_a"):
            value = torch.log(-value)
        sd[param].copy_(value.reshape(sd[param].shape))
    return ref


def _NAME_PAIRS(c) -> dict[str, str]:
    """hylm parameter -> GGUF name, the same correspondence llama_cpp_tensors writes."""
    out = {"model.embeddings.weight": "token_embd.weight", "model.norm_f.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    per_kind = {
        "M": {"in_proj.weight": "ssm_in.weight", "conv1d.weight": "ssm_conv1d.weight", "conv1d.bias": "ssm_conv1d.bias",
              "dt_bias": "ssm_dt.bias", "A_log": "ssm_a", "D": "ssm_d", "norm.weight": "ssm_norm.weight",
              "out_proj.weight": "ssm_out.weight"},
        "*": {"q_proj.weight": "attn_q.weight", "k_proj.weight": "attn_k.weight", "v_proj.weight": "attn_v.weight",
              "o_proj.weight": "attn_output.weight"},
        "E": {"gate.weight": "ffn_gate_inp.weight", "gate.e_score_correction_bias": "exp_probs_b.bias",
              "experts.up_proj": "ffn_up_exps.weight", "experts.down_proj": "ffn_down_exps.weight",
              "shared_experts.up_proj.weight": "ffn_up_shexp.weight",
              "shared_experts.down_proj.weight": "ffn_down_shexp.weight",
              "fc1_latent_proj.weight": "ffn_latent_down.weight", "fc2_latent_proj.weight": "ffn_latent_up.weight"},
        "-": {"up_proj.weight": "ffn_up.weight", "down_proj.weight": "ffn_down.weight"},
    }
    for i, kind in enumerate(c.pattern):
        out[f"model.layers.{i}.norm.weight"] = f"blk.{i}.attn_norm.weight"
        for ours, theirs in per_kind[kind].items():
            if "latent" in ours and not c.moe_latent_size:
                continue
            out[f"model.layers.{i}.mixer.{ours}"] = f"blk.{i}.{theirs}"
    return out


@pytest.fixture(scope="module")
def moe_model():
    return tiny_model(0, MOE_CFG)


# ---- (a) files written by the gguf package load into hylm -----------------------------------------------

@pytest.mark.parametrize("cfg", [MOE_CFG, DENSE_CFG], ids=["nemotron_h_moe", "nemotron_h"])
def test_f32_reference_file_loads_with_the_source_logits(tmp_path, cfg):
    model = tiny_model(1, cfg)
    write_reference_gguf(model, tmp_path / "m.gguf")
    loaded = hylm.load_model(tmp_path / "m.gguf")
    # the config comes from the metadata: layer kinds from the per-layer arrays, sizes from ssm/expert keys
    for field in ("pattern", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel",
                  "layer_norm_epsilon"):
        assert getattr(loaded.config, field) == getattr(cfg, field), field
    if "E" in cfg.pattern:
        for field in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "moe_latent_size",
                      "moe_shared_expert_intermediate_size", "routed_scaling_factor", "n_group", "topk_group",
                      "norm_topk_prob"):
            assert getattr(loaded.config, field) == getattr(cfg, field), field
    else:
        assert loaded.config.intermediate_size == cfg.intermediate_size
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        # A_log travels as -exp(A_log): the only rounding is log(exp(.)), a few ulps
        assert _rel(loaded(ids), model(ids)) < 1e-6


@pytest.mark.parametrize("qtype", [QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0])
def test_quantized_reference_file_matches_the_dequantized_weights(tmp_path, moe_model, qtype):
    stored = write_reference_gguf(moe_model, tmp_path / "m.gguf", qtype)
    loaded = hylm.load_model(tmp_path / "m.gguf")
    ref = reference_model(moe_model, stored)
    ids = _ids(MOE_CFG.vocab_size, seed=1)
    with torch.no_grad():
        assert _rel(loaded(ids), ref(ids)) < 1e-5
    if qtype == QT.Q8_0:  # Q8_0 stays packed: the int8 values and fp16 scales are exactly the file's
        layer = loaded.model.layers[0].mixer
        assert isinstance(layer.in_proj, Q8_0Linear) and isinstance(loaded.model.layers[2].mixer.experts, Q8_0Experts)
        raw = stored["blk.0.ssm_in.weight"][0].reshape(-1, 34)
        assert torch.equal(layer.in_proj.qweight.reshape(-1, 32), torch.from_numpy(raw[:, 2:].view(np.int8).copy()))
        assert torch.equal(layer.in_proj.scales.reshape(-1), torch.from_numpy(raw[:, :2].copy().view(np.float16)[:, 0]))
        assert isinstance(loaded.lm_head, Q8_0Linear)  # the head too: decode reads it every token
        assert loaded.dtype == torch.float32
    else:
        assert not any(isinstance(m, (Q8_0Linear, Q8_0Experts)) for m in loaded.modules())


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_K, QT.Q6_K])
def test_k_quant_reference_file_matches_the_dequantized_weights(tmp_path, qtype):
    model = tiny_model(2, KQ_CFG)
    stored = write_reference_gguf(model, tmp_path / "m.gguf", qtype)
    assert stored["blk.0.ssm_in.weight"][1] == qtype and stored["blk.2.ffn_up_exps.weight"][1] == qtype
    loaded = hylm.load_model(tmp_path / "m.gguf", dtype="fp32")
    ref = reference_model(model, stored)
    ids = _ids(KQ_CFG.vocab_size, seed=2)
    with torch.no_grad():
        assert _rel(loaded(ids), ref(ids)) < 1e-5


def test_loading_in_slabs_gives_the_same_weights(tmp_path, moe_model, monkeypatch):
    """Large tensors (expert stacks) are dequantised a slab of rows at a time; tiny slabs change nothing."""
    import hylm.weights.gguf_loader as loader

    write_reference_gguf(moe_model, tmp_path / "m.gguf", QT.Q4_0)
    whole = hylm.load_model(tmp_path / "m.gguf").state_dict()
    monkeypatch.setattr(loader, "_SLAB_ELEMENTS", 100)
    sliced = hylm.load_model(tmp_path / "m.gguf").state_dict()
    assert all(torch.equal(whole[k], sliced[k]) for k in whole)


def test_bf16_load_dtype(tmp_path, moe_model):
    write_reference_gguf(moe_model, tmp_path / "m.gguf", QT.Q8_0)
    loaded = hylm.load_model(tmp_path / "m.gguf", dtype="bf16")
    assert loaded.dtype == loaded.model.embeddings.weight.dtype == torch.bfloat16
    assert loaded.model.layers[2].mixer.gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(loaded(_ids(MOE_CFG.vocab_size))).all()


def test_trailing_nextn_blocks_are_skipped(tmp_path, moe_model):
    """A file with an MTP block appended (nextn_predict_layers) loads its trunk."""
    path = tmp_path / "m.gguf"
    write_reference_gguf(moe_model, path)
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(tmp_path / "mtp.gguf"), "nemotron_h_moe")
    n = len(MOE_CFG.pattern)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key.endswith((".head_count_kv", ".feed_forward_length")):
            value = value + [MOE_CFG.num_key_value_heads if key.endswith("kv") else MOE_CFG.moe_intermediate_size]
        if key.endswith(".block_count"):
            value = n + 1
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, value, vtype)
    w.add_nextn_predict_layers(1)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.add_tensor(f"blk.{n}.attn_norm.weight", np.ones(MOE_CFG.hidden_size, dtype=np.float32))
    w.add_tensor(f"blk.{n}.nextn.eh_proj.weight", np.zeros((MOE_CFG.hidden_size, 2 * MOE_CFG.hidden_size),
                                                           dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    loaded = hylm.load_model(tmp_path / "mtp.gguf")
    assert loaded.config.pattern == MOE_CFG.pattern
    ids = _ids(MOE_CFG.vocab_size)
    with torch.no_grad():
        assert _rel(loaded(ids), moe_model(ids)) < 1e-6


def test_problems_are_reported_together(tmp_path, moe_model):
    stored = write_reference_gguf(moe_model, tmp_path / "ok.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "nemotron_h_moe")
    reader = gguf.GGUFReader(str(tmp_path / "ok.gguf"))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        kw = {"sub_type": field.types[-1]} if vtype == gguf.GGUFValueType.ARRAY else {}
        w.add_key_value(key, field.contents(), vtype, **kw)
    for name, (data, _) in stored.items():
        if name == "blk.0.ssm_out.weight":
            continue  # missing
        if name == "blk.1.attn_q.weight":
            data = data[:, :-1].copy()  # wrong shape
        w.add_tensor(name, data)
    w.add_tensor("blk.0.surprise.weight", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError) as err:
        hylm.load_model(tmp_path / "bad.gguf")
    msg = str(err.value)
    assert "blk.0.ssm_out.weight" in msg and "blk.1.attn_q.weight" in msg and "blk.0.surprise.weight" in msg
    (tmp_path / "trunc.gguf").write_bytes((tmp_path / "ok.gguf").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        hylm.load_model(tmp_path / "trunc.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="not a Nemotron-H model"):
        hylm.load_model(tmp_path / "llama.gguf")


# ---- (c) the packed Q8_0 compute path ------------------------------------------------------------------------

def test_q8_0_blocks_decode_as_the_gguf_package_does():
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    raw = gguf.quants.quantize(w, QT.Q8_0)
    q, s = q8_0_split_blocks(raw, 96)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and q.shape == (48, 96) and s.shape == (48, 3)
    assert torch.equal(dequantize_q8_0(q, s), torch.from_numpy(gguf.quants.dequantize(raw, QT.Q8_0)))


def test_q8_0_linear_and_experts_match_the_dequantized_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 96, generator=g)
    q, s = q8_0_split_blocks(gguf.quants.quantize(w.numpy(), QT.Q8_0), 96)
    lin = Q8_0Linear(96, 200, bias=True)
    lin.qweight.copy_(q)
    lin.scales.copy_(s)
    lin.bias.data.normal_(generator=g)
    dense = dequantize_q8_0(q, s)
    for n in (1, 7):  # decode (one row) and prefill shapes
        x = torch.randn(n, 96, generator=g)
        torch.testing.assert_close(lin(x), F.linear(x, dense, lin.bias), rtol=1e-5, atol=1e-5)
    assert lin.qweight.nbytes + lin.scales.nbytes == 200 * 96 * 8.5 / 8  # 8.5 bits per weight in memory

    e, d, i = 6, 64, 32
    up, down = torch.randn(e, i, d, generator=g), torch.randn(e, d, i, generator=g)
    packed = Q8_0Experts(e, d, i)
    for proj, value in (("up_proj", up), ("down_proj", down)):
        q, s = q8_0_split_blocks(gguf.quants.quantize(value.numpy(), QT.Q8_0), value.shape[-1])
        getattr(packed, f"{proj}_qweight").copy_(q)
        getattr(packed, f"{proj}_scales").copy_(s)
    ref = Experts(e, d, i)
    ref.up_proj.data.copy_(packed.dequantize("up_proj"))
    ref.down_proj.data.copy_(packed.dequantize("down_proj"))
    x = torch.randn(9, d, generator=g)
    ids = torch.randint(0, e, (9, 2), generator=g)
    weights = torch.rand(9, 2, generator=g)
    with torch.no_grad():
        # same weights, fp32 both ways: only the summation order differs (outputs reach ~1e3 after relu^2)
        assert _rel(packed(x, weights, ids), ref(x, weights, ids)) < 1e-6
        assert _rel(packed(x[:1], weights[:1], ids[:1]), ref(x[:1], weights[:1], ids[:1])) < 1e-6


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_native_q8_0_rows_match_float64_and_the_tiled_path(rows, with_bias, monkeypatch):
    """Decode-sized products read the packed weight in hylm's native kernel (dequantised in registers):
    against float64 from the same blocks, and against the tiled PyTorch path; scales include zero and
    subnormal fp16 values."""
    from hylm.model import gguf_quant
    from hylm.ops import native

    if not native.available():
        pytest.skip("no C compiler: native kernels not built")
    g = torch.Generator().manual_seed(rows)
    out_f, in_f = 203, 160
    q = torch.randint(-127, 128, (out_f, in_f), generator=g, dtype=torch.int8)
    s = (torch.rand(out_f, in_f // 32, generator=g) * 0.01).to(torch.float16)
    s[0, 0], s[1, 2], s[2, 1] = 0.0, 3e-6, -2e-7  # zero, subnormal halves
    bias = torch.randn(out_f, generator=g) if with_bias else None
    x = torch.randn(rows, in_f, generator=g)
    ref = x.double() @ dequantize_q8_0(q, s, torch.float64).t() + (bias.double() if with_bias else 0.0)

    calls = []
    lib = native.library()
    monkeypatch.setattr(gguf_quant.native, "library", lambda: type("L", (), {
        "hylm_q8_0_rows": staticmethod(lambda *a: calls.append(1) or lib.hylm_q8_0_rows(*a))})())
    got = gguf_quant.q8_0_linear(x, q, s, bias)
    assert calls, "the native kernel did not run"
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(gguf_quant, "native_enabled", False)
    torch.testing.assert_close(got, gguf_quant.q8_0_linear(x, q, s, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 8, 20])
def test_native_q8_0_experts_match_float64(rows, monkeypatch):
    """Decode-sized batches run every chosen expert of every token in one native call: against float64 from
    the dequantised experts, and against the PyTorch loop over experts."""
    from hylm.model import gguf_quant
    from hylm.ops import native

    if not native.available():
        pytest.skip("no C compiler: native kernels not built")
    g = torch.Generator().manual_seed(rows)
    e, d, i, k = 6, 64, 96, 2
    packed = Q8_0Experts(e, d, i)
    for proj, shape in (("up_proj", (e, i, d)), ("down_proj", (e, d, i))):
        value = torch.randn(*shape, generator=g) * 0.1
        q, s = q8_0_split_blocks(gguf.quants.quantize(value.numpy(), QT.Q8_0), shape[-1])
        getattr(packed, f"{proj}_qweight").copy_(q)
        getattr(packed, f"{proj}_scales").copy_(s)
    x = torch.randn(rows, d, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(rows)])
    weights = torch.rand(rows, k, generator=g)
    up, down = packed.dequantize("up_proj", torch.float64), packed.dequantize("down_proj", torch.float64)
    ref = torch.zeros(rows, d, dtype=torch.float64)
    for r in range(rows):
        for j in range(k):
            hid = torch.relu(up[ids[r, j]] @ x[r].double()) ** 2
            ref[r] += weights[r, j].double() * (down[ids[r, j]] @ hid)
    calls = []
    original = packed._native
    monkeypatch.setattr(packed, "_native", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        got = packed(x, weights, ids)
        assert calls, "the native kernel did not run"
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(gguf_quant, "native_enabled", False)
        torch.testing.assert_close(got, packed(x, weights, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype,bound", [(QT.Q4_K, 0.08), (QT.Q5_K, 0.04), (QT.Q6_K, 0.02)])
def test_k_quant_encoder_round_trips_through_the_gguf_decoder(qtype, bound):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 512)).astype(np.float32)
    w[1] = 0.0  # all-zero blocks
    w[2, :256] = -3.0  # a constant block
    w[3] = np.abs(w[3])  # all-positive rows (the offset is clamped at 0)
    raw = hylm_quantize(w, qtype)
    assert raw.shape == (16, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
    back = gguf.quants.dequantize(raw, qtype)
    assert np.all(back[1] == 0)
    np.testing.assert_allclose(back[2, :256], -3.0, rtol=2e-3)
    assert np.sqrt(((back - w) ** 2).mean() / (w ** 2).mean()) < bound


# ---- (b) export ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An hylm checkpoint directory: tiny MoE model + the test tokenizer (with chat template)."""
    from chat_fixtures import build_test_tokenizer

    from hylm.chat.tokenizer import Tokenizer
    from hylm.weights import save_hf_checkpoint

    path = tmp_path_factory.mktemp("ckpt")
    build_test_tokenizer(path)
    config = MOE_CFG.replace(vocab_size=Tokenizer.from_dir(path).vocab_size, eos_token_id=[2, 11])
    model = tiny_model(3, config)
    save_hf_checkpoint(model, path)
    return path, model


def _cli(*argv) -> tuple[int, str, str]:
    from hylm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_export_f32_writes_every_tensor_and_key_and_loads_back(tmp_path, checkpoint):
    src, model = checkpoint
    out = tmp_path / "m.gguf"
    rc, stdout, _ = _cli("export-gguf", str(src), str(out), "--type", "f32", "--no-progress")
    assert rc == 0 and "nemotron_h_moe" in stdout
    c = model.config
    reader = gguf.GGUFReader(str(out))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    a = "nemotron_h_moe."
    expected = {
        "general.architecture": "nemotron_h_moe", a + "block_count": 5, a + "context_length": 4096,
        a + "embedding_length": 64, a + "vocab_size": c.vocab_size, a + "attention.head_count": 4,
        a + "attention.head_count_kv": [0, 2, 0, 0, 0], a + "feed_forward_length": [0, 0, 32, 0, 32],
        a + "attention.key_length": 16, a + "attention.value_length": 16, a + "rope.dimension_count": 16,
        a + "ssm.conv_kernel": 4, a + "ssm.inner_size": 64, a + "ssm.state_size": 16, a + "ssm.time_step_rank": 4,
        a + "ssm.group_count": 2, a + "expert_count": 8, a + "expert_used_count": 2,
        a + "expert_feed_forward_length": 32, a + "expert_shared_feed_forward_length": 64,
        a + "expert_shared_count": 1, a + "expert_weights_norm": True, a + "expert_weights_scale": 2.0,
        a + "expert_group_count": 2, a + "expert_group_used_count": 1, a + "moe_latent_size": 32,
        "general.file_type": int(gguf.LlamaFileType.ALL_F32), "general.quantization_version": 2,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 11, "tokenizer.ggml.unknown_token_id": 0,
    }
    for key, value in expected.items():
        got = fields[key]
        assert (got == pytest.approx(value) if isinstance(value, float) else got == value), key
    assert fields[a + "attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    # the tokenizer, id by id, with the merges and the chat template
    tok = json.loads((src / "tokenizer.json").read_text())
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    by_id.update({t["id"]: t["content"] for t in tok["added_tokens"]})
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == c.vocab_size and tokens == [by_id[i] for i in range(c.vocab_size)]
    assert types[11] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in tok["model"]["merges"]]
    assert fields["tokenizer.chat_template"] == json.loads((src / "tokenizer_config.json").read_text())["chat_template"]
    # every tensor: llama.cpp's name, shape and transform, f32 values equal to the source's
    want = llama_cpp_tensors(model)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    for name, array in want.items():
        assert got[name].tensor_type == QT.F32
        np.testing.assert_array_equal(np.asarray(got[name].data), array.astype(np.float32), err_msg=name)
    loaded = hylm.load_model(out)
    ids = _ids(c.vocab_size)
    with torch.no_grad():
        assert _rel(loaded(ids), model(ids)) < 1e-6
    # the file's vocabulary is a working tokenizer again
    from hylm.chat.tokenizer import Tokenizer
    from hylm.weights.gguf_tokenizer import tokenizer_from_gguf

    original, rebuilt = Tokenizer.from_dir(src), tokenizer_from_gguf(out)
    text = "<|im_start|>user\nThe fox paid 1,000,000 café 😀 naïve?<|im_end|>\n<think>ok</think>"
    assert rebuilt.encode(text) == original.encode(text)
    assert rebuilt.decode(original.encode(text), skip_special_tokens=False) == text
    assert rebuilt.eos_token_ids == [11] and rebuilt.special_ids == original.special_ids


@pytest.mark.parametrize("qtype", ["q8_0", "q4_k"])
def test_quantized_export_keeps_llama_cpp_f32_tensors_and_matches_the_decoded_weights(tmp_path, checkpoint, qtype):
    src, model = checkpoint
    out = tmp_path / "m.gguf"
    rc, _, _ = _cli("export-gguf", str(src), str(out), "--type", qtype, "--no-progress")
    assert rc == 0
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in reader.tensors}
    for name in ("blk.0.attn_norm.weight", "blk.0.ssm_a", "blk.0.ssm_d", "blk.0.ssm_conv1d.weight",
                 "blk.0.ssm_conv1d.bias", "blk.0.ssm_dt.bias", "blk.0.ssm_norm.weight", "blk.2.ffn_gate_inp.weight",
                 "blk.2.exp_probs_b.bias", "output_norm.weight"):
        assert types[name] == QT.F32, name
    # rows of 64 / 32 elements cannot hold a 256-element k-quant block: Q8_0 instead
    assert types["blk.0.ssm_in.weight"] == QT.Q8_0 and types["blk.2.ffn_up_exps.weight"] == QT.Q8_0
    stored = {t.name: (np.array(t.data), t.tensor_type) for t in reader.tensors}
    ref = reference_model(model, stored)
    loaded = hylm.load_model(out)
    ids = _ids(model.config.vocab_size, seed=4)
    with torch.no_grad():
        assert _rel(loaded(ids), ref(ids)) < 1e-5


def test_export_k_quants_where_rows_fit(tmp_path):
    from hylm.weights.gguf_export import write_gguf

    model = tiny_model(5, KQ_CFG)
    out = tmp_path / "kq.gguf"
    summary = write_gguf(model, out, "q5_k")
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ssm_in.weight"] == QT.Q5_K and types["blk.2.ffn_down_exps.weight"] == QT.Q5_K
    assert summary["tokenizer"]["model"] == "none" and reader.get_field("tokenizer.ggml.model").contents() == "none"
    ref = reference_model(model, {t.name: (np.array(t.data), t.tensor_type) for t in reader.tensors})
    ids = _ids(KQ_CFG.vocab_size)
    with torch.no_grad():
        assert _rel(hylm.load_model(out)(ids), ref(ids)) < 1e-5


def test_hylm_trained_tokenizer_round_trips_with_the_refact_pre_tokenizer(tmp_path):
    """hylm's own tokenizers split digits one by one before the GPT-2 regex: llama.cpp's "refact"."""
    from chat_fixtures import CORPUS

    from hylm.chat.tokenizer import Tokenizer
    from hylm.train.tokenizer import train_tokenizer
    from hylm.weights.gguf_export import write_gguf
    from hylm.weights.gguf_tokenizer import tokenizer_from_gguf

    train_tokenizer(CORPUS, 400, tmp_path, min_frequency=1)
    original = Tokenizer.from_dir(tmp_path)
    model = tiny_model(7, MOE_CFG.replace(vocab_size=original.vocab_size + 5))  # padded rows
    summary = write_gguf(model, tmp_path / "m.gguf", "f32", tokenizer_dir=tmp_path)
    assert summary["tokenizer"]["pre"] == "refact" and not summary["warnings"]
    tokens = gguf.GGUFReader(str(tmp_path / "m.gguf")).get_field("tokenizer.ggml.tokens").contents()
    assert len(tokens) == original.vocab_size + 5 and tokens[-1] == f"[PAD{original.vocab_size + 4}]"
    rebuilt = tokenizer_from_gguf(tmp_path / "m.gguf")
    for text in ("Total: 1234567 + 89 = 1234656", "<|im_start|>assistant\n<think>x</think>42<|im_end|>", "café 😀"):
        assert rebuilt.encode(text) == original.encode(text), text
    assert rebuilt.special_ids == original.special_ids and not rebuilt.is_special(12)  # <think> is markup


def test_tied_embeddings_are_written_once_and_tied_again(tmp_path):
    from hylm.weights.gguf_export import write_gguf

    cfg = MOE_CFG.replace(tie_word_embeddings=True)
    model = tiny_model(6, cfg)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embeddings.weight)
    write_gguf(model, tmp_path / "tied.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "tied.gguf")).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # llama.cpp reuses token_embd
    loaded = hylm.load_model(tmp_path / "tied.gguf")
    assert loaded.config.tie_word_embeddings
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        assert _rel(loaded(ids), model(ids)) < 1e-6


def test_a_directory_holding_the_gguf_and_tokenizer_serves_text(tmp_path, checkpoint):
    import shutil

    from hylm.engine.llm import LLM
    from hylm.engine.sampling_params import SamplingParams

    src, model = checkpoint
    d = tmp_path / "gguf_dir"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / f, d / f)
    assert _cli("export-gguf", str(src), str(d / "model.gguf"), "--type", "q8_0", "--no-progress")[0] == 0
    assert hylm.loader.load_config(d).eos_token_ids() == [11, 2]  # metadata eos + generation_config's
    llm = LLM(str(d))
    out = llm.generate("The fox", SamplingParams(max_tokens=4, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 4 and isinstance(out.text, str)
    rc, stdout, _ = _cli("inspect", str(d / "model.gguf"))
    assert rc == 0 and "M*EME" in stdout


# ---- (d) CLI errors --------------------------------------------------------------------------------------------

def test_cli_errors_are_one_line(tmp_path, checkpoint):
    src, _ = checkpoint
    cases = [
        (("export-gguf", str(tmp_path / "missing"), str(tmp_path / "o.gguf")), "no such model"),
        (("export-gguf", str(src), str(tmp_path / "o.gguf"), "--type", "q3_k"), "unknown GGUF type"),
        (("export-gguf", str(src), str(tmp_path / "nodir" / "o.gguf")), "no such directory"),
        (("export-gguf", str(src), str(tmp_path)), "is a directory"),
    ]
    (tmp_path / "exists.gguf").write_bytes(b"")
    cases.append((("export-gguf", str(src), str(tmp_path / "exists.gguf")), "already exists"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    cases.append((("export-gguf", str(tmp_path / "junk.gguf"), str(tmp_path / "o.gguf")), "not a readable GGUF"))
    cases.append((("inspect", str(tmp_path / "junk.gguf")), "not a readable GGUF"))
    for argv, needle in cases:
        rc, _, err = _cli(*argv)
        assert rc == 2, argv
        assert err.count("\n") == 1 and err.startswith("hylm: error: ") and needle in err, (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o.gguf").exists()


# ---- (e) llama.cpp itself, where installed --------------------------------------------------------------------

def test_llama_cpp_runs_the_exported_model_with_hylm_logits(tmp_path, checkpoint):
    """llama.cpp runs in a child process of its own, as its users run it; f32 KV cache, flash attention off
    (its f16 accumulation costs ~1e-4 relative otherwise)."""
    import subprocess
    import sys

    pytest.importorskip("llama_cpp")
    src, model = checkpoint
    out = tmp_path / "m.gguf"
    assert _cli("export-gguf", str(src), str(out), "--type", "f32", "--no-progress")[0] == 0
    ids = _ids(model.config.vocab_size, seed=7)[0].tolist()
    scores = tmp_path / "scores.npy"
    code = f"""
import llama_cpp, numpy as np
kwargs = dict(model_path={str(out)!r}, n_ctx=64, logits_all=True, n_threads=1, n_threads_batch=1, verbose=False,
              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
llm = llama_cpp.Llama(**kwargs, flash_attn=False)
llm.eval({ids})
np.save({str(scores)!r}, np.array(llm.scores[:{len(ids)}], dtype=np.float32))
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    theirs = torch.from_numpy(np.load(scores))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
        from_gguf = hylm.load_model(out)(torch.tensor([ids]))[0]
    assert _rel(from_gguf, ours) < 1e-6  # hylm reading its own export
    assert _rel(theirs, ours) < 1e-5, (_rel(theirs, ours), _rel(theirs, from_gguf))


def test_packed_q8_0_model_decodes_the_same_alone_and_batched(tmp_path):
    """Regression: q8_0_linear once returned a transposed (non-row-contiguous) [N, out] view for N > 1, which
    the model mishandled when several sequences decoded together (batch 1 was right)."""
    import json

    from hylm.engine.llm import LLM
    from hylm.engine.sampling_params import SamplingParams
    from hylm.model.gguf_quant import Q8_0Linear, q8_0_linear

    q = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    s = torch.rand(8, 2).half()
    y = q8_0_linear(torch.randn(3, 64), q, s)
    assert y.is_contiguous()
    model_dir = Path(__file__).resolve().parents[1] / "models" / "hylm-tiny"
    out = tmp_path / "q8.gguf"
    assert _cli("export-gguf", str(model_dir), str(out), "--type", "q8_0", "--no-progress")[0] == 0
    model = hylm.load_model(out)
    assert any(isinstance(m, Q8_0Linear) for m in model.modules())
    cases = json.loads((Path(__file__).parent / "golden" / "hylm_tiny.json").read_text())[:5]
    prompts = [c["prompt_ids"] for c in cases]
    params = SamplingParams(temperature=0.0, max_tokens=10)
    alone = [LLM(model, max_num_seqs=1, max_model_len=1024).generate([p], params)[0].outputs[0].token_ids
             for p in prompts]
    batched = [c.outputs[0].token_ids for c in LLM(model, max_num_seqs=8, max_model_len=1024).generate(prompts, params)]
    assert batched == alone
