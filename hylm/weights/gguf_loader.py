"""GGUF files (llama.cpp's `nemotron_h_moe` / `nemotron_h`) -> a ModelConfig and a NemotronHModel.

The config comes from the file's metadata, read the way llama.cpp reads it (see gguf_layout): layer kinds
from the per-layer `attention.head_count_kv` / `feed_forward_length` arrays, Mamba sizes from `ssm.*`,
MoE sizes from `expert_*` and `moe_latent_size` (Super's latent projections), the vocabulary size from
the token embedding, biases and tied embeddings from which tensors are present. Trailing NextN (MTP)
blocks (`nextn_predict_layers`) are skipped: hylm does not load an MTP block from GGUF.

Weights: every tensor type the `gguf` package decodes is accepted (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, Q2_K..Q6_K, IQ*). Q8_0 projections (Mamba in/out, attention, shared and routed experts,
latent projections, dense MLPs) stay packed in memory as Q8_0Linear / Q8_0Experts (hylm.model.gguf_quant),
which compute from the packed form, and so does a Q8_0 lm_head (`output.weight`; the model's dtype is then its
embeddings'); every other tensor is dequantised to the requested dtype (the embeddings always). llama.cpp's
transforms are undone:
A_log = log(-ssm_a), D and conv1d reshaped back, ssm_norm flattened, stacked experts kept stacked.
Problems (missing, unexpected, mis-shaped tensors, unreadable types) are reported together in one
CheckpointError.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from ..config import ATTENTION, MAMBA, MLP, MOE, ConfigError, ModelConfig
from ..model.gguf_quant import Q8_0_BLOCK, Q8_0Experts, Q8_0Linear, q8_0_split_blocks
from ..model.moe import Experts
from .errors import CheckpointError, tensor_problems
from .gguf_layout import ARCHES, PLAIN, TensorSpec, from_gguf, gguf_shape, kinds_from_arrays, layout
from .gguf_quants import dequantize
from .hf_safetensors import _set

QT = gguf.GGMLQuantizationType
K = gguf.Keys
_REQUIRED = object()
_SLAB_ELEMENTS = 1 << 24  # fp32 elements dequantised at once while loading (64 MiB)


def find_gguf(path: str | os.PathLike) -> Path | None:
    """The GGUF file `path` names: the file itself, or the single .gguf of a directory that holds no
    safetensors weights (a directory with tokenizer files next to the GGUF). None otherwise."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix.lower() == ".gguf" else None
    if not p.is_dir() or any(p.glob("*.safetensors")):
        return None
    found = sorted(f for f in p.glob("*.gguf") if f.is_file())
    if len(found) > 1:
        raise CheckpointError(f"{p}: holds {len(found)} GGUF files ({', '.join(f.name for f in found)}); "
                              "pass the file to load")
    return found[0] if found else None


class GGUFFile:
    """An opened GGUF file: its architecture, metadata fields and tensors (memory-mapped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
            raise CheckpointError(f"{self.path}: not a readable GGUF file, truncated or corrupt ({e})") from None
        self.arch = self.get(K.General.ARCHITECTURE, None)
        if self.arch not in ARCHES:
            raise CheckpointError(f"{self.path}: architecture {self.arch!r} is not a Nemotron-H model "
                                  f"(expected one of {', '.join(sorted(ARCHES))})")
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """A metadata value (arrays as lists); `{arch}` in the key is the file's architecture."""
        key = key.format(arch=getattr(self, "arch", ""))
        field = self.reader.get_field(key)
        if field is None:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return field.contents()

    def per_layer(self, key: str, n: int, default: Any = _REQUIRED) -> list[int]:
        """A per-layer value stored as an array of n, or as one scalar for all layers."""
        value = self.get(key, default)
        if isinstance(value, list):
            if len(value) != n:
                raise CheckpointError(f"{self.path}: {key.format(arch=self.arch)} has {len(value)} entries for "
                                      f"{n} blocks")
            return [int(v) for v in value]
        return [int(value)] * n

    def shape(self, name: str) -> tuple[int, ...]:
        """Row-major (torch) shape of a tensor: GGUF records the dimensions innermost first."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    def read(self, name: str) -> np.ndarray:
        """A tensor dequantised to fp32, row-major."""
        t = self.tensors[name]
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self.shape(name))

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Dequantise a tensor into `out` (its row-major shape, any dtype and device) a slab of the leading
        dimension at a time, so that a stack of experts never exists whole in fp32."""
        t = self.tensors[name]
        lead = out.shape[0] if out.ndim > 1 else 1
        per_row = max(1, out.numel() // max(lead, 1))
        step = max(1, _SLAB_ELEMENTS // per_row)
        data = t.data.reshape(lead, -1) if out.ndim > 1 else t.data.reshape(1, -1)
        flat = out.view(lead, -1)
        for lo in range(0, lead, step):
            slab = np.asarray(dequantize(np.ascontiguousarray(data[lo: lo + step]), t.tensor_type), dtype=np.float32)
            if not slab.flags.writeable:  # F32 data is a view of the read-only file mapping
                slab = slab.copy()
            flat[lo: lo + step].copy_(torch.from_numpy(slab.reshape(-1, per_row)))


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-5, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _uniform(values: list[int], what: str, path: Path) -> int:
    distinct = sorted(set(values))
    if len(distinct) != 1:
        raise CheckpointError(f"{path}: {what} differs between layers ({distinct}); hylm needs one value")
    return distinct[0]


def config_from_gguf(file: GGUFFile) -> ModelConfig:
    """The ModelConfig a GGUF file's metadata (and tensor presence) describes."""
    n_blocks = int(file.get(K.LLM.BLOCK_COUNT))
    n_nextn = int(file.get(K.LLM.NEXTN_PREDICT_LAYERS, 0) or 0)
    n = n_blocks - n_nextn
    if n <= 0:
        raise CheckpointError(f"{file.path}: {n_blocks} blocks of which {n_nextn} are NextN blocks: no trunk")
    kv = file.per_layer(K.Attention.HEAD_COUNT_KV, n_blocks)[:n]
    ff = file.per_layer(K.LLM.FEED_FORWARD_LENGTH, n_blocks)[:n]
    n_expert = int(file.get(K.LLM.EXPERT_COUNT, 0) or 0)
    pattern = kinds_from_arrays(kv, ff, lambda i: n_expert > 0 and f"blk.{i}.ffn_gate_inp.weight" in file.tensors)
    hidden = int(file.get(K.LLM.EMBEDDING_LENGTH))
    if "token_embd.weight" not in file.tensors:
        raise CheckpointError(f"{file.path}: no token_embd.weight tensor")
    vocab = file.shape("token_embd.weight")[0]  # the embedding's rows (the token list may be padded)

    def layers_of(kind: str) -> list[int]:
        return [i for i, k in enumerate(pattern) if k == kind]

    def has(tensor: str, layers: list[int]) -> bool:
        present = [f"blk.{i}.{tensor}" in file.tensors for i in layers]
        if any(present) and not all(present):
            raise CheckpointError(f"{file.path}: blk.*.{tensor} is present on some layers only")
        return bool(present) and present[0]

    def on(layers: list[int], values: list[int]) -> list[int]:
        return [values[i] for i in layers]

    c: dict[str, Any] = dict(vocab_size=vocab, hidden_size=hidden, pattern=pattern,
                             layer_norm_epsilon=_f32(file.get(K.Attention.LAYERNORM_RMS_EPS, 1e-5)),
                             max_position_embeddings=int(file.get(K.LLM.CONTEXT_LENGTH, 4096)),
                             tie_word_embeddings="output.weight" not in file.tensors)
    attn = layers_of(ATTENTION)
    if attn:
        heads = on(attn, file.per_layer(K.Attention.HEAD_COUNT, n_blocks)[:n])
        c["num_attention_heads"] = _uniform(heads, "attention.head_count", file.path)
        c["num_key_value_heads"] = _uniform(on(attn, kv), "attention.head_count_kv", file.path)
        c["head_dim"] = int(file.get(K.Attention.KEY_LENGTH, hidden // c["num_attention_heads"]))
        value_dim = int(file.get(K.Attention.VALUE_LENGTH, c["head_dim"]))
        if value_dim != c["head_dim"]:
            raise CheckpointError(f"{file.path}: key_length {c['head_dim']} != value_length {value_dim}")
        c["attention_bias"] = has("attn_q.bias", attn)
    mamba = layers_of(MAMBA)
    if mamba:
        heads = int(file.get(K.SSM.TIME_STEP_RANK))
        inner = int(file.get(K.SSM.INNER_SIZE))
        if heads <= 0 or inner % heads:
            raise CheckpointError(f"{file.path}: ssm.inner_size {inner} is not a multiple of "
                                  f"ssm.time_step_rank {heads} (the Mamba head count)")
        c.update(mamba_num_heads=heads, mamba_head_dim=inner // heads, ssm_state_size=int(file.get(K.SSM.STATE_SIZE)),
                 n_groups=int(file.get(K.SSM.GROUP_COUNT, 1)), conv_kernel=int(file.get(K.SSM.CONV_KERNEL)),
                 use_conv_bias=has("ssm_conv1d.bias", mamba), use_bias=has("ssm_in.bias", mamba))
    dense = layers_of(MLP)
    if dense:
        c["intermediate_size"] = _uniform(on(dense, ff), "feed_forward_length", file.path)
    moe = layers_of(MOE)
    if moe:
        inter = file.get(K.LLM.EXPERT_FEED_FORWARD_LENGTH, None)
        inter = on(moe, file.per_layer(K.LLM.EXPERT_FEED_FORWARD_LENGTH, n_blocks)[:n]) if inter is not None \
            else on(moe, ff)
        used = file.per_layer(K.LLM.EXPERT_USED_COUNT, n_blocks)[:n]
        groups = int(file.get(K.LLM.EXPERT_GROUP_COUNT, 0) or 0)
        latent = int(file.get(K.LLM.MOE_LATENT_SIZE, 0) or 0)
        c.update(n_routed_experts=n_expert, num_experts_per_tok=_uniform(on(moe, used), "expert_used_count", file.path),
                 moe_intermediate_size=_uniform(inter, "expert_feed_forward_length", file.path),
                 moe_shared_expert_intermediate_size=int(file.get(K.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH, 0) or 0),
                 n_shared_experts=int(file.get(K.LLM.EXPERT_SHARED_COUNT, 1) or 1),
                 moe_latent_size=latent or None,
                 norm_topk_prob=bool(file.get(K.LLM.EXPERT_WEIGHTS_NORM, False)),
                 # llama.cpp multiplies by the stored scale; a file without it means no scaling
                 routed_scaling_factor=_f32(file.get(K.LLM.EXPERT_WEIGHTS_SCALE, 1.0)),
                 n_group=max(groups, 1), topk_group=max(int(file.get(K.LLM.EXPERT_GROUP_USED_COUNT, 0) or 0), 1))
    if dense or moe:
        c["mlp_bias"] = any(has(t, ls) for t, ls in (("ffn_up.bias", dense), ("ffn_up_shexp.bias", moe),
                                                     ("ffn_latent_down.bias", moe)) if ls)
    tok = K.Tokenizer
    bos, eos = file.get(tok.BOS_ID, None), file.get(tok.EOS_ID, None)
    ends = [int(i) for i in (eos, file.get(tok.EOT_ID, None), file.get(tok.EOM_ID, None)) if i is not None]
    ends = list(dict.fromkeys(ends))
    if bos is not None:
        c["bos_token_id"] = int(bos)
    if ends:
        c["eos_token_id"] = ends if len(ends) > 1 else ends[0]
    pad = file.get(tok.PAD_ID, None)
    if pad is not None:
        c["pad_token_id"] = int(pad)
    try:
        config = ModelConfig(**c)
        config.validate()
        return config
    except ConfigError as e:
        raise CheckpointError(f"{file.path}: the metadata describes no valid model ({e})") from None


def read_gguf_config(path: str | os.PathLike) -> ModelConfig:
    return config_from_gguf(GGUFFile(path))


# ---- weights ----------------------------------------------------------------------------------------------

def _module_of(param: str) -> tuple[str, str]:
    module, _, attr = param.rpartition(".")
    return module, attr


def _swap_q8_0_modules(model: nn.Module, specs: dict[str, TensorSpec], file: GGUFFile, dtype: torch.dtype,
                       device: torch.device | str) -> set[str]:
    """Replace the Linear layers and routed experts whose GGUF weights are Q8_0 by packed modules (on the
    target device, zero-filled). Returns the parameter names now held packed."""
    packed: set[str] = set()

    def is_q8_0(param: str) -> bool:
        spec = specs.get(param)
        return spec is not None and spec.name in file.tensors and file.tensors[spec.name].tensor_type == QT.Q8_0

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and is_q8_0(f"{name}.weight") \
                and module.in_features % Q8_0_BLOCK == 0:
            new = Q8_0Linear(module.in_features, module.out_features, module.bias is not None, dtype=dtype,
                             device=device)
            packed.add(f"{name}.weight")
        elif isinstance(module, Experts):
            up, down = is_q8_0(f"{name}.up_proj"), is_q8_0(f"{name}.down_proj")
            if not (up or down):
                continue
            e, inter, d_in = module.up_proj.shape
            new = Q8_0Experts(e, d_in, inter, up, down, dtype=dtype, device=device)
            packed.update(p for p, q in ((f"{name}.up_proj", up), (f"{name}.down_proj", down)) if q)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new.requires_grad_(False))
    return packed


def load_gguf_checkpoint(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype,
                         device: torch.device | str = "cpu") -> None:
    """Fill `model` (built on the meta device from read_gguf_config(path)) from the GGUF file, in place."""
    file = GGUFFile(path)
    config = model.config
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    shapes.update({n: tuple(b.shape) for n, b in model.named_buffers()})
    specs = {s.param: s for s in layout(shapes, file.arch)}
    by_gguf = {s.name: s for s in specs.values()}
    n_trunk = config.num_hidden_layers

    unexpected = []
    for name in file.tensors:
        if name in by_gguf:
            continue
        parts = name.split(".")
        if parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) >= n_trunk:
            continue  # a NextN (MTP) block: not loaded
        unexpected.append(name)
    tied = config.tie_word_embeddings and "output.weight" not in file.tensors
    optional = {s.name for s in specs.values() if s.param.endswith("e_score_correction_bias")}
    if tied:
        optional.add("output.weight")
    missing, wrong_shape, bad_type = [], [], []
    for spec in specs.values():
        if spec.name not in file.tensors:
            if spec.name not in optional:
                missing.append(spec.name)
            continue
        want = gguf_shape(spec, shapes[spec.param], config)
        got = file.shape(spec.name)
        if got != want:
            wrong_shape.append(f"{spec.name}: file {list(got)} vs model {list(want)}")
        qtype = file.tensors[spec.name].tensor_type
        if qtype not in (QT.F32, QT.F16) and not hasattr(gguf.quants, qtype.name):  # the package's decoders
            bad_type.append(f"{spec.name} ({qtype.name})")
    problems = tensor_problems(missing, unexpected, wrong_shape)
    if bad_type:
        problems.append(f"tensors of a type hylm cannot decode ({len(bad_type)}): {', '.join(bad_type)}")
    if problems:
        raise CheckpointError(f"GGUF file {file.path} does not match its metadata:\n  " + "\n  ".join(problems))

    packed = _swap_q8_0_modules(model, specs, file, dtype, device)
    for param, spec in specs.items():
        source = "token_embd.weight" if (tied and spec.name == "output.weight") else spec.name
        if source not in file.tensors:  # an optional buffer the file leaves out (routing correction bias)
            _set(model, param, torch.zeros(shapes[param], dtype=torch.float32, device=device))
            continue
        module_name, attr = _module_of(param)
        if param in packed:
            raw = file.tensors[source].data
            module = model.get_submodule(module_name)
            if isinstance(module, Q8_0Linear):
                q, s = q8_0_split_blocks(raw, module.in_features)
                module.qweight.copy_(q)
                module.scales.copy_(s)
            else:  # Q8_0Experts: `attr` is up_proj / down_proj
                q, s = q8_0_split_blocks(raw, module.proj_shape(attr)[1])
                getattr(module, f"{attr}_qweight").copy_(q)
                getattr(module, f"{attr}_scales").copy_(s)
            continue
        keep_fp32 = param.endswith("e_score_correction_bias")  # routing stays exact in any dtype
        target = torch.float32 if keep_fp32 else dtype
        if spec.transform == PLAIN:  # straight into the parameter, slab by slab
            value = torch.empty(shapes[param], dtype=target, device=device)
            file.read_into(source, value)
        else:  # small reshaped Mamba tensors
            try:
                value = from_gguf(spec, torch.from_numpy(file.read(source).copy()), shapes[param])
            except ValueError as e:
                raise CheckpointError(f"GGUF file {file.path}: {e}") from None
            value = value.to(device=device, dtype=target)
        _set(model, param, value)
    del file


__all__ = ["find_gguf", "GGUFFile", "config_from_gguf", "read_gguf_config", "load_gguf_checkpoint"]
