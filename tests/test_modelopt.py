"""ModelOpt checkpoints: synthetic NVFP4 and MIXED_PRECISION checkpoints written here tensor by tensor in
NVIDIA's layout load into packed modules that hold exactly the written bytes, dequantise to the hand
formula and give the logits of a dense model holding the dequantised weights; `hylm quantize` round
trips; packed weights stay 4.5 bits per weight in memory; bad checkpoints give one clear error."""

import json
import os
import subprocess
import sys
from fnmatch import fnmatchcase

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import hylm
from engine_models import TINY, tiny_model
from hylm.model.linear import Linear as DenseLinear
from hylm.model.moe import Experts
from hylm.model.quantized import (FP8Linear, NVFP4Linear, QuantizedExperts, dequantize_model, quantize_model,
                                  quantized_modules)
from hylm.ops.fp8 import quantize_fp8
from hylm.ops.nvfp4 import quantize_nvfp4, unpack_nibbles
from hylm.weights import CheckpointError

# every width a multiple of 16 except none: hidden 64, d_inner 64, MoE 32, shared 48, dense 96, latent 32
CFG = TINY.replace(moe_latent_size=32, num_nextn_predict_layers=1, mtp_pattern="*E")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _hand_dequant_nvfp4(packed, scales, gs):
    vals = E2M1[unpack_nibbles(packed).long()]
    return vals * scales.float().repeat_interleave(16, dim=1) * gs.float().reshape(())


def _linear_modules(model):
    """checkpoint module name -> (hylm name, dense weight) for every Linear and expert projection."""
    out = {}
    for name, m in model.named_modules():
        ck = "backbone." + name[len("model."):] if name.startswith("model.") else name
        if isinstance(m, nn.Linear):
            out[ck] = (name, m.weight.detach())
        elif isinstance(m, Experts):
            for proj in ("up_proj", "down_proj"):
                for e in range(m.up_proj.shape[0]):
                    out[f"{ck}.{e}.{proj}"] = (f"{name}.{proj}[{e}]", getattr(m, proj)[e].detach())
    return out


def write_modelopt(model, directory, fmt_of, quant, where=("config", "hf"), scalar_shape=(), extra=None):
    """Write `model` as NVIDIA ModelOpt would: per module X quantised by fmt_of(X) ("nvfp4" | "fp8" | None):
    X.weight (uint8 packed / float8_e4m3fn), X.weight_scale, X.weight_scale_2 (NVFP4), X.input_scale; the rest
    bf16 (the router's correction bias fp32), routed experts one tensor each. Returns (written tensors,
    reference dequantised fp32 weights per checkpoint module name)."""
    directory.mkdir(parents=True, exist_ok=True)
    modules = _linear_modules(model)
    tensors, reference = {}, {}
    for ck, (_, w) in modules.items():
        fmt = fmt_of(ck)
        if fmt == "nvfp4":
            packed, scales, gs = quantize_nvfp4(w.float())
            tensors[f"{ck}.weight"], tensors[f"{ck}.weight_scale"] = packed, scales
            tensors[f"{ck}.weight_scale_2"] = gs.reshape(scalar_shape)
            tensors[f"{ck}.input_scale"] = torch.tensor(0.01).reshape(scalar_shape)
            reference[ck] = _hand_dequant_nvfp4(packed, scales, gs)
        elif fmt == "fp8":
            w8, scale = quantize_fp8(w.float())
            tensors[f"{ck}.weight"], tensors[f"{ck}.weight_scale"] = w8, scale.reshape(scalar_shape)
            tensors[f"{ck}.input_scale"] = torch.tensor(0.02).reshape(scalar_shape)
            reference[ck] = w8.float() * scale
        else:
            tensors[f"{ck}.weight"] = w.to(torch.bfloat16).contiguous()
            reference[ck] = w.to(torch.bfloat16).float()
    linear_params = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, t in model.state_dict().items():
        if name in linear_params or name.endswith(("experts.up_proj", "experts.down_proj")):
            continue
        ck = "backbone." + name[len("model."):] if name.startswith("model.") else name
        keep = name.endswith("e_score_correction_bias")
        tensors[ck] = (t.float() if keep else t.to(torch.bfloat16)).contiguous()
    tensors.update(extra or {})
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_hf_dict()
    if "config" in where:
        cfg["quantization_config"] = {"quant_method": "modelopt", **quant}
    (directory / "config.json").write_text(json.dumps(cfg))
    if "hf" in where:
        (directory / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt", "version": "0.35.0"}, "quantization": quant}))
    return tensors, reference


def reference_model(model, reference):
    """A dense fp32 copy of `model` holding the reference (dequantised / bf16-rounded) weights."""
    ref = hylm.load_model(model.config)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(p.to(torch.bfloat16).float() if not name.endswith("e_score_correction_bias") else p)
        for ck, (name, _) in _linear_modules(ref).items():
            if "[" in name:
                mod, e = name[:-1].split("[")
                mod, proj = mod.rsplit(".", 1)
                getattr(ref.get_submodule(mod), proj)[int(e)].copy_(reference[ck])
            else:
                ref.get_submodule(name).weight.copy_(reference[ck])
    return ref


# Nano-like NVFP4: lm_head, attention layers and the Mamba layer before each attention layer excluded
# (patterns and exact names mixed); MTP not mentioned (stored bf16 anyway, as NVIDIA does)
NVFP4_QUANT = {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
               "exclude_modules": ["lm_head", "backbone.layers.2.mixer*", "backbone.layers.6.mixer.*_proj",
                                   "backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.out_proj",
                                   "backbone.layers.4.mixer*"]}


def _nvfp4_fmt(ck):
    if ck.startswith("mtp.") or any(fnmatchcase(ck, p) for p in NVFP4_QUANT["exclude_modules"]):
        return None
    return "nvfp4"


def _mixed_layers():
    layers = {}
    for e in range(CFG.n_routed_experts):  # layer 1's experts listed one by one, layer 3's by a pattern
        for proj in ("up_proj", "down_proj"):
            layers[f"backbone.layers.1.mixer.experts.{e}.{proj}"] = {"quant_algo": "NVFP4", "group_size": 16}
    layers["backbone.layers.3.mixer.experts.*"] = {"quant_algo": "NVFP4", "group_size": 16}
    for i in (0, 4, 7):
        layers[f"backbone.layers.{i}.mixer.in_proj"] = {"quant_algo": "FP8"}
        layers[f"backbone.layers.{i}.mixer.out_proj"] = {"quant_algo": "FP8"}
    for i in (1, 3):
        for m in ("shared_experts.up_proj", "shared_experts.down_proj", "fc1_latent_proj", "fc2_latent_proj"):
            layers[f"backbone.layers.{i}.mixer.{m}"] = {"quant_algo": "FP8"}
    layers["backbone.layers.5.mixer.up_proj"] = {"quant_algo": "FP8"}
    layers["backbone.layers.5.mixer.down_proj"] = {"quant_algo": "FP8"}
    return layers


MIXED_QUANT = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "FP8", "quantized_layers": _mixed_layers(),
               "exclude_modules": ["lm_head"]}


def _mixed_fmt(ck):
    for pattern, entry in MIXED_QUANT["quantized_layers"].items():
        if fnmatchcase(ck, pattern):
            return entry["quant_algo"].lower()
    return None


@pytest.fixture(scope="module")
def dense():
    return tiny_model(seed=5, config=CFG)


def _check_loaded(model, loaded, tensors, reference, fmt_of):
    """Packed buffers hold the written bytes, dequantise to the reference, dense weights are the bf16 values."""
    checked = 0
    for ck, (name, _) in _linear_modules(model).items():
        fmt = fmt_of(ck)
        if "[" in name:
            mod, e = name[:-1].split("[")
            mod, proj = mod.rsplit(".", 1)
            module, e = loaded.get_submodule(mod), int(e)
            if fmt is None:
                assert not isinstance(module, QuantizedExperts) or module.formats[proj] is None, ck
                w = module.dequantize(proj)[e] if isinstance(module, QuantizedExperts) else getattr(module, proj)[e]
                assert torch.equal(w.float(), reference[ck]), ck
                continue
            assert isinstance(module, QuantizedExperts) and module.formats[proj] == fmt, ck
            assert torch.equal(getattr(module, proj)[e].view(torch.uint8), tensors[f"{ck}.weight"].view(torch.uint8))
            assert torch.equal(getattr(module, f"{proj}_weight_scale")[e].reshape(-1).view(torch.uint8),
                               tensors[f"{ck}.weight_scale"].reshape(-1).view(torch.uint8)), ck
            assert torch.equal(module.dequantize(proj)[e], reference[ck]), ck
        else:
            module = loaded.get_submodule(name)
            if fmt is None:
                assert type(module) is DenseLinear and torch.equal(module.weight, reference[ck]), ck
                continue
            assert isinstance(module, NVFP4Linear if fmt == "nvfp4" else FP8Linear), ck
            assert torch.equal(module.weight.view(torch.uint8), tensors[f"{ck}.weight"].view(torch.uint8)), ck
            assert torch.equal(module.weight_scale.reshape(-1).view(torch.uint8),
                               tensors[f"{ck}.weight_scale"].reshape(-1).view(torch.uint8)), ck
            assert torch.equal(module.dequantize(), reference[ck]), ck
        checked += 1
    return checked


def assert_logits_close(got, want):
    """allclose at 1e-5 relative to the logits' scale (|logits| reach ~13 here; fp32 op order differs)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def _logits(model, seed=0):
    ids = torch.randint(3, CFG.vocab_size, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


def test_nvfp4_checkpoint_loads_packed_and_matches_reference(tmp_path, dense):
    # the quantization config only in hf_quant_config.json, scalars stored 0-d
    tensors, reference = write_modelopt(dense, tmp_path / "nv", _nvfp4_fmt, NVFP4_QUANT, where=("hf",))
    loaded = hylm.load_model(tmp_path / "nv")
    n = _check_loaded(dense, loaded, tensors, reference, _nvfp4_fmt)
    assert n == 12 + 2 * 2 * CFG.n_routed_experts  # 2 MoE layers x 4 Linears, MLP 2, Mamba 7: 2; experts
    assert type(loaded.model.layers[0].mixer.in_proj) is DenseLinear  # Mamba layer before attention: bf16
    for name, p in loaded.mtp.named_parameters():  # MTP bf16 in the file, dense in memory
        assert p.dtype == torch.float32 and torch.equal(p, dense.mtp.get_parameter(name).to(torch.bfloat16).float())
    assert not any(n.startswith("mtp.") for n in quantized_modules(loaded))
    assert_logits_close(_logits(loaded), _logits(reference_model(dense, reference)))


def test_mixed_precision_checkpoint_loads_packed_and_matches_reference(tmp_path, dense):
    # config in both files (as NVIDIA ships it), scalars stored as [1], FP8 KV-cache scales present (ignored)
    kv = {f"backbone.layers.{i}.mixer.{p}_proj.{p}_scale": torch.tensor([1.0]) for i in (2, 6) for p in "kv"}
    tensors, reference = write_modelopt(dense, tmp_path / "mx", _mixed_fmt, MIXED_QUANT, scalar_shape=(1,), extra=kv)
    loaded = hylm.load_model(tmp_path / "mx")
    _check_loaded(dense, loaded, tensors, reference, _mixed_fmt)
    kinds = {type(m).__name__ for m in quantized_modules(loaded).values()}
    assert kinds == {"FP8Linear", "QuantizedExperts"}
    assert type(loaded.model.layers[2].mixer.q_proj) is DenseLinear
    assert loaded.model.layers[1].mixer.experts.up_proj_weight_scale_2.shape == (CFG.n_routed_experts,)
    assert torch.equal(loaded.model.layers[0].mixer.in_proj.input_scale, torch.tensor(0.02))
    assert_logits_close(_logits(loaded), _logits(reference_model(dense, reference)))
    # in bf16 the packed weights stay packed, the remainder is bf16
    bf = hylm.load_model(tmp_path / "mx", dtype="bf16")
    assert bf.model.layers[1].mixer.experts.up_proj.dtype == torch.uint8
    assert bf.model.layers[2].mixer.q_proj.weight.dtype == torch.bfloat16
    assert bf.model.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.isfinite(_logits(bf)).all()


def _storage_bytes(t):
    return t.untyped_storage().nbytes()


def test_nvfp4_weights_stay_4_5_bits_in_memory(tmp_path, dense):
    everything = lambda ck: None if ck.startswith("mtp.") or ck == "lm_head" else "nvfp4"  # noqa: E731
    write_modelopt(dense, tmp_path / "all", everything, {"quant_algo": "NVFP4", "exclude_modules": ["lm_head"]})
    loaded = hylm.load_model(tmp_path / "all")
    n_weights, packed_bytes = 0, 0
    for name, m in quantized_modules(loaded).items():
        tensors = ([m.weight, m.weight_scale] if isinstance(m, NVFP4Linear) else
                   [getattr(m, f"{p}{s}") for p in ("up_proj", "down_proj") for s in ("", "_weight_scale")])
        for t in tensors:
            assert t.dtype in (torch.uint8, torch.float8_e4m3fn), name
            # each packed tensor owns exactly its bytes: not a view into a file mapping or a larger buffer
            assert _storage_bytes(t) == t.numel(), name
            packed_bytes += t.numel()
        n_weights += (m.in_features * m.out_features if isinstance(m, NVFP4Linear)
                      else 2 * m.num_experts * m.input_size * m.intermediate_size)
    assert n_weights > 0 and packed_bytes * 8 / n_weights == 4.5
    dense_linear = sum(m.weight.numel() for n, m in loaded.named_modules()
                       if isinstance(m, nn.Linear) and not n.startswith("mtp.") and n != "lm_head")
    assert dense_linear == 0
    # the whole model: packed layers at 4.5 bits, the rest (embeddings, lm_head, norms, conv, router, MTP) fp32
    seen, total = set(), 0
    for t in list(loaded.parameters()) + list(loaded.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += _storage_bytes(t)
    rest = sum(t.numel() * t.element_size() for n, t in list(loaded.named_parameters()) + list(loaded.named_buffers())
               if t.dtype not in (torch.uint8, torch.float8_e4m3fn) and not n.endswith(("scale_2", "input_scale")))
    scalars = sum(t.numel() * 4 for n, t in loaded.named_buffers() if n.endswith(("scale_2", "input_scale")))
    assert total == packed_bytes + rest + scalars


def _save_dense(model, path):
    from hylm.weights import save_hf_checkpoint

    save_hf_checkpoint(model, path)
    (path / "tokenizer.json").write_text("{}")  # copied along by hylm quantize
    return path


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8", "mixed"])
def test_cli_quantize_round_trip(tmp_path, dense, fmt):
    from hylm.cli import main

    src = _save_dense(dense, tmp_path / "src")
    out = tmp_path / f"q_{fmt}"
    assert main(["quantize", str(src), str(out), "--format", fmt, "--dtype", "fp32", "--no-progress"]) == 0
    assert (out / "tokenizer.json").exists() and (out / "hf_quant_config.json").exists()
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "modelopt"
    assert cfg["quant_algo"] == {"nvfp4": "NVFP4", "fp8": "FP8", "mixed": "MIXED_PRECISION"}[fmt]
    stored = load_file(str(out / "model.safetensors"))
    assert all(not k.startswith("model.") for k in stored)
    loaded = hylm.load_model(out)
    # the same as quantising in memory
    expected = quantize_model(hylm.load_model(src), fmt)
    assert set(quantized_modules(loaded)) == set(quantized_modules(expected))
    for name, t in expected.state_dict().items():
        got = loaded.state_dict()[name]
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), name
    torch.testing.assert_close(_logits(loaded), _logits(expected), rtol=0, atol=0)
    # packed modules dequantise to a dense model that computes the same logits
    assert_logits_close(_logits(loaded), _logits(dequantize_model(expected)))
    if fmt == "mixed":
        assert stored["backbone.layers.1.mixer.experts.0.up_proj.weight"].dtype == torch.uint8
        assert stored["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.float8_e4m3fn
        assert stored["backbone.layers.2.mixer.q_proj.weight"].dtype == torch.float32
        assert stored["mtp.layers.0.eh_proj.weight"].dtype == torch.float32
        # the engine generates from it
        out_ids = hylm.LLM(loaded, max_num_seqs=1).generate([5, 6, 7], hylm.SamplingParams(max_tokens=4))
        assert len(out_ids[0].outputs[0].token_ids) == 4


def test_cli_quantize_bf16_sharded_calibrated(tmp_path, dense):
    from hylm.cli import main

    src = _save_dense(dense, tmp_path / "src")
    out = tmp_path / "q"
    assert main(["quantize", str(src), str(out), "--format", "nvfp4", "--calib-tokens", "8",
                 "--max-shard-size", "0.0001", "--no-progress"]) == 0
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    loaded = hylm.load_model(out, dtype="bf16")
    lin = loaded.model.layers[7].mixer.in_proj
    assert isinstance(lin, NVFP4Linear) and lin.input_scale.item() != 1.0  # calibrated
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.isfinite(_logits(loaded)).all()
    # refuses to overwrite without --overwrite, and a bad format is an argparse error
    assert main(["quantize", str(src), str(out), "--no-progress"]) == 2
    with pytest.raises(SystemExit):
        main(["quantize", str(src), str(out), "--format", "int3"])


def _mixed_ckpt(tmp_path, dense, **kw):
    return write_modelopt(dense, tmp_path / "bad", _mixed_fmt, MIXED_QUANT, **kw)


def test_errors_missing_scale_and_dtype(tmp_path, dense):
    tensors, _ = _mixed_ckpt(tmp_path, dense)
    del tensors["backbone.layers.1.mixer.experts.3.down_proj.weight_scale"]
    tensors["backbone.layers.0.mixer.in_proj.weight"] = tensors["backbone.layers.0.mixer.in_proj.weight"].float()
    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        hylm.load_model(tmp_path / "bad")
    msg = str(e.value)
    assert "missing tensors (1): backbone.layers.1.mixer.experts.3.down_proj.weight_scale" in msg
    assert "backbone.layers.0.mixer.in_proj.weight: stored F32, expected F8_E4M3" in msg


def test_errors_truncated_file(tmp_path, dense):
    _mixed_ckpt(tmp_path, dense)
    path = tmp_path / "bad" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        hylm.load_model(tmp_path / "bad")


def test_errors_quantized_tensor_where_config_says_dense(tmp_path, dense):
    quant = dict(MIXED_QUANT, exclude_modules=["lm_head", "backbone.layers.5.mixer.up_proj"])
    write_modelopt(dense, tmp_path / "bad", _mixed_fmt, quant)
    with pytest.raises(CheckpointError) as e:
        hylm.load_model(tmp_path / "bad")
    assert "backbone.layers.5.mixer.up_proj.weight" in str(e.value)
    assert "unexpected tensors" in str(e.value)  # its weight_scale / input_scale


@pytest.mark.parametrize("quant, match", [
    ({"quant_algo": "W4A8_AWQ"}, "quant_algo 'W4A8_AWQ' is not supported"),
    ({"quant_method": "gptq", "quant_algo": "NVFP4"}, "quantization method 'gptq' is not supported"),
    ({"quant_algo": "NVFP4", "group_size": 32}, "group_size 32"),
    ({"quant_algo": "MIXED_PRECISION",
      "quantized_layers": {"backbone.layers.0.mixer.in_proj": {"quant_algo": "INT8_SQ"}}},
     "quant_algo 'INT8_SQ' is not supported"),
])
def test_errors_unsupported_config(tmp_path, dense, quant, match):
    write_modelopt(dense, tmp_path / "bad", lambda ck: None, quant)
    with pytest.raises(CheckpointError, match=match):
        hylm.load_model(tmp_path / "bad")


def test_errors_experts_mixing_formats(tmp_path, dense):
    layers = dict(MIXED_QUANT["quantized_layers"])
    layers["backbone.layers.1.mixer.experts.2.up_proj"] = {"quant_algo": "FP8"}
    quant = dict(MIXED_QUANT, quantized_layers=layers)
    write_modelopt(dense, tmp_path / "bad", lambda ck: _mixed_fmt(ck) if not ck.endswith("experts.2.up_proj")
                   else "fp8", quant)
    with pytest.raises(CheckpointError, match="experts mix formats"):
        hylm.load_model(tmp_path / "bad")


_RSS_SCRIPT = r"""
import gc, json, sys, torch
import hylm
from hylm.loader import load_model
import hylm.weights.modelopt, hylm.model.quantized, safetensors.torch  # imports are not the model's memory
from hylm.loader import load_config
from hylm.model import NemotronHModel
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
with torch.device("meta"):  # torch's one-time set-up on first module construction (~150 MB) is not the model
    NemotronHModel(load_config(sys.argv[1]))
gc.collect(); before = rss()
model = load_model(sys.argv[1], dtype="bf16")
gc.collect(); after = rss()
nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
print(json.dumps({"delta": after - before, "tensor_bytes": nbytes}))
"""


@pytest.mark.slow
def test_resident_memory_of_loaded_nvfp4_model(tmp_path):
    """Process RSS after loading a ~100M-parameter NVFP4 checkpoint: about its packed size, far below bf16."""
    cfg = TINY.replace(hidden_size=1024, pattern="MEME", mamba_num_heads=32, mamba_head_dim=64, n_groups=2,
                       ssm_state_size=64, n_routed_experts=16, moe_intermediate_size=1024, moe_latent_size=None,
                       moe_shared_expert_intermediate_size=2048, vocab_size=512, num_attention_heads=8, head_dim=128)
    model = hylm.load_model(cfg, dtype="bf16")
    n_params = sum(p.numel() for p in model.parameters())
    quantize_model(model, "nvfp4")
    from hylm.weights.quantize import save_modelopt_checkpoint

    save_modelopt_checkpoint(model, tmp_path / "big")
    del model
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "big")], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    r = json.loads(res.stdout.strip().splitlines()[-1])
    bf16_bytes = 2 * n_params
    assert r["tensor_bytes"] < 0.35 * bf16_bytes
    # resident growth = the tensors (packed layers + the bf16 remainder), no second copy, no file mapping
    assert r["delta"] < 1.1 * r["tensor_bytes"] + 8 * 2**20, r
