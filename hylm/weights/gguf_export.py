"""Write a model as a GGUF file laid out as llama.cpp's converter writes Nemotron-H (`hylm export-gguf`).

Metadata (keys under the architecture `nemotron_h_moe` or `nemotron_h`): block_count, context_length,
embedding_length, vocab_size, feed_forward_length and attention.head_count_kv per layer (they encode the
layer kinds, see gguf_layout), attention.head_count / key_length / value_length / layer_norm_rms_epsilon,
rope.dimension_count, ssm.conv_kernel / inner_size / state_size / time_step_rank (the Mamba head count) /
group_count, and for MoE models expert_count, expert_used_count, expert_feed_forward_length,
expert_shared_feed_forward_length, expert_shared_count, expert_weights_norm, expert_weights_scale
(routed_scaling_factor), expert_group_count, expert_group_used_count and moe_latent_size (latent MoE);
general.file_type and general.quantization_version; the tokenizer (gguf_tokenizer).

Tensors follow gguf_layout. Those llama.cpp keeps in F32 (1-D tensors, norms, ssm_a, ssm_d, biases, conv
weights, the router) stay F32 whatever the type; the rest are stored in the requested type, or in its
fallback when a row length is not a multiple of the type's block (gguf_quants.plan_type). The MTP block
is not written. Tensors are converted and written one at a time (bounded memory) into a temporary file
that replaces OUT only once complete.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from ..config import MLP, MOE
from .gguf_layout import TensorSpec, architecture, gguf_shape, layer_arrays, layout, stays_f32, to_gguf
from .gguf_quants import EXPORT_TYPES, plan_type, quantize
from .gguf_tokenizer import add_tokenizer

QT = gguf.GGMLQuantizationType
FILE_TYPES = {QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
              QT.BF16: gguf.LlamaFileType.MOSTLY_BF16, QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
              QT.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S, QT.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K}


def parse_type(name: str | QT) -> QT:
    if isinstance(name, QT):
        return name
    key = str(name).lower()
    if key not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF type {name!r} (use one of {', '.join(EXPORT_TYPES)})")
    return EXPORT_TYPES[key]


def add_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    """The architecture's hyper-parameters, as llama.cpp's converter writes them."""
    c = config
    kv, ff = layer_arrays(c)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_vocab_size(c.vocab_size)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_rope_dimension_count(c.head_dim)  # unused (no positional encoding) but read by llama.cpp
    writer.add_layer_norm_rms_eps(c.layer_norm_epsilon)
    writer.add_layer_norm_eps(c.layer_norm_epsilon)  # llama.cpp's nemotron_h_moe loader reads this key too
    # llama.cpp reads the ssm keys unconditionally for these architectures
    writer.add_ssm_conv_kernel(c.conv_kernel)
    writer.add_ssm_inner_size(c.mamba_d_inner)
    writer.add_ssm_state_size(c.ssm_state_size)
    writer.add_ssm_time_step_rank(c.mamba_num_heads)
    writer.add_ssm_group_count(c.n_groups)
    if MOE in c.pattern:
        writer.add_expert_count(c.n_routed_experts)
        writer.add_expert_used_count(c.num_experts_per_tok)
        writer.add_expert_feed_forward_length(c.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(c.moe_shared_expert_intermediate_size or 0)
        writer.add_expert_shared_count(c.n_shared_experts if c.moe_shared_expert_intermediate_size else 0)
        writer.add_expert_weights_norm(bool(c.norm_topk_prob))
        writer.add_expert_weights_scale(float(c.routed_scaling_factor))
        writer.add_expert_group_count(c.n_group)
        writer.add_expert_group_used_count(c.topk_group)
        if c.moe_latent_size:
            writer.add_moe_latent_size(c.moe_latent_size)


def _stored_type(spec: TensorSpec, shape: tuple[int, ...], qtype: QT) -> QT:
    return QT.F32 if stays_f32(spec, len(shape)) else plan_type(qtype, shape[-1])


def _dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters with every packed module (NVFP4 / FP8 / Q8_0) dequantised."""
    from ..model.gguf_quant import Q8_0_MODULES, dequantize_q8_0_modules
    from ..model.quantized import QUANTIZED_MODULES, dequantize_model

    if any(isinstance(m, QUANTIZED_MODULES) for m in model.modules()):
        dequantize_model(model, torch.float32)
    if any(isinstance(m, Q8_0_MODULES) for m in model.modules()):
        dequantize_q8_0_modules(model, torch.float32)
    return model.state_dict()


def write_gguf(model: nn.Module, path: str | os.PathLike, qtype: str | QT = "f16",
               tokenizer_dir: str | os.PathLike | None = None, tokenizer_pre: str | None = None,
               name: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Write `model` to `path` as GGUF. Packed modules (NVFP4 / FP8 / Q8_0) of `model` are dequantised in
    place first. Returns a summary: architecture, tensor counts per stored type, bytes, skipped
    parameters (the MTP block), tokenizer summary, warnings."""
    from tqdm import tqdm

    qtype = parse_type(qtype)
    config = model.config
    path = Path(path)
    arch = architecture(config)
    state = _dense_state(model)
    specs = layout({n: tuple(t.shape) for n, t in state.items()}, arch)
    covered = {s.param for s in specs}
    skipped = [n for n in state if n not in covered]
    if config.tie_word_embeddings and torch.equal(state["lm_head.weight"], state["model.embeddings.weight"]):
        specs = [s for s in specs if s.param != "lm_head.weight"]  # llama.cpp reuses token_embd

    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(name or (path.stem))
        add_hparams(writer, config)
        writer.add_file_type(FILE_TYPES[qtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tok = add_tokenizer(writer, tokenizer_dir, config.vocab_size, config, tokenizer_pre)

        plan: list[tuple[TensorSpec, QT]] = []
        for spec in specs:
            shape = gguf_shape(spec, tuple(state[spec.param].shape), config)
            stored = _stored_type(spec, shape, qtype)
            byte_shape = gguf.quant_shape_to_byte_shape(shape, stored) if stored not in (QT.F32, QT.F16) else shape
            itemsize = {QT.F32: 4, QT.F16: 2}.get(stored, 1)
            np_dtype = {QT.F32: np.float32, QT.F16: np.float16}.get(stored, np.uint8)
            writer.add_tensor_info(spec.name, byte_shape, np.dtype(np_dtype), int(np.prod(byte_shape)) * itemsize,
                                   raw_dtype=None if stored in (QT.F32, QT.F16) else stored)
            plan.append((spec, stored))
        total = sum(state[s.param].numel() for s, _ in plan)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=total, unit="param", unit_scale=True, desc=f"converting ({qtype.name.lower()})",
                  disable=not progress) as bar:
            for spec, stored in plan:
                value = to_gguf(spec, state[spec.param], config).contiguous().numpy()
                writer.write_tensor_data(quantize(value, stored))
                bar.update(state[spec.param].numel())
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    counts = Counter(stored.name.lower() for _, stored in plan)
    warnings = list(tok["warnings"])
    if MOE in config.pattern and MLP in config.pattern:
        warnings.append("the model mixes MoE and dense MLP layers: hylm loads the file, but llama.cpp's "
                        f"{arch} treats every FFN layer as MoE and cannot run it")
    return {"architecture": arch, "warnings": warnings, "type": qtype.name.lower(), "tensors": dict(counts), "bytes": path.stat().st_size,
            "skipped": skipped, "tokenizer": tok}


def export_gguf(model_path: str | os.PathLike, out: str | os.PathLike, qtype: str = "f16",
                tokenizer_pre: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Load a model (an hylm / HF / ModelOpt checkpoint directory, or a GGUF file) and write it to `out`."""
    from ..loader import load_model

    from ..loader import load_config

    qtype = parse_type(qtype)
    # a bf16 / fp16 checkpoint loads in its own dtype (half the memory of fp32, nothing lost): each tensor
    # is widened to fp32 only while it is converted
    stored = str(load_config(model_path).extra.get("torch_dtype", "float32"))
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(stored, torch.float32)
    model = load_model(model_path, dtype=dtype)
    source = Path(model_path)
    tokenizer_dir = source if source.is_dir() else source.parent
    return write_gguf(model, out, qtype, tokenizer_dir=tokenizer_dir, tokenizer_pre=tokenizer_pre,
                      name=source.stem if source.is_file() else source.resolve().name, progress=progress)


__all__ = ["write_gguf", "export_gguf", "add_hparams", "parse_type", "FILE_TYPES"]
