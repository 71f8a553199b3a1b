"""How llama.cpp lays out a Nemotron-H model in GGUF: architecture names, hyper-parameter keys, tensor names
and the tensor transforms its converter (convert_hf_to_gguf.py, NemotronHModel / Mamba2Model) applies.
Shared by the GGUF loader and exporter, so that both sides agree by construction.

Architecture: `nemotron_h_moe` when the model has MoE layers (every FFN layer is then MoE), `nemotron_h`
otherwise (FFN layers are dense squared-ReLU MLPs).

Layer kinds are not stored; llama.cpp derives them from two per-layer arrays:
  attention.head_count_kv[i] == 0 and feed_forward_length[i] == 0  -> Mamba-2
  feed_forward_length[i] == 0 (head_count_kv[i] > 0)               -> attention
  otherwise                                                         -> MoE if expert_count > 0, else MLP
The converter writes head_count_kv = num_key_value_heads on attention layers (0 elsewhere) and
feed_forward_length = moe_intermediate_size on MoE layers / intermediate_size on MLP layers (0 elsewhere).

Tensors (hylm name -> GGUF name, transform applied on export; the loader undoes it):
  model.embeddings.weight -> token_embd.weight;  model.norm_f.weight -> output_norm.weight;
  lm_head.weight -> output.weight (absent in files with tied embeddings)
  per layer i, `model.layers.{i}.norm.weight` -> blk.{i}.attn_norm.weight (every layer's pre-norm), and
  mixer.in_proj -> ssm_in;  mixer.conv1d.weight [C, 1, K] -> ssm_conv1d.weight [C, K] (squeezed);
  mixer.conv1d.bias -> ssm_conv1d.bias;  mixer.dt_bias -> ssm_dt.bias;
  mixer.A_log [H] -> ssm_a [H, 1] holding A = -exp(A_log);  mixer.D [H] -> ssm_d [H, 1];
  mixer.norm.weight [d_inner] -> ssm_norm.weight [n_groups, d_inner / n_groups];  mixer.out_proj -> ssm_out;
  mixer.{q,k,v,o}_proj -> attn_{q,k,v,output};
  mixer.gate.weight -> ffn_gate_inp.weight;  mixer.gate.e_score_correction_bias -> exp_probs_b.bias;
  mixer.experts.up_proj / down_proj [E, out, in] -> ffn_up_exps / ffn_down_exps.weight (stacked);
  mixer.shared_experts.{up,down}_proj -> ffn_{up,down}_shexp;
  mixer.fc1_latent_proj -> ffn_latent_down;  mixer.fc2_latent_proj -> ffn_latent_up;
  mixer.{up,down}_proj (dense MLP) -> ffn_{up,down}.
(Torch shapes are given row-major; GGUF records the dimensions in the reverse order.)
The MTP block is not part of the layout (llama.cpp's converter exports it only on request, in a
format that is still changing); the exporter leaves it out and the loader skips trailing NextN blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import gguf
import torch

from ..config import ATTENTION, MAMBA, MLP, MOE, ModelConfig

T = gguf.MODEL_TENSOR
ARCH_MOE = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.NEMOTRON_H_MOE]
ARCH_DENSE = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.NEMOTRON_H]
ARCHES = {ARCH_MOE: gguf.MODEL_ARCH.NEMOTRON_H_MOE, ARCH_DENSE: gguf.MODEL_ARCH.NEMOTRON_H}

# transforms between a hylm parameter and its GGUF tensor
PLAIN, CONV1D, SSM_A, COLUMN, GROUPED = "plain", "conv1d", "ssm_a", "column", "grouped"

# hylm name after `model.layers.{i}.mixer.` -> (GGUF tensor, suffix, transform)
_MIXER: dict[str, tuple[T, str, str]] = {
    "in_proj.weight": (T.SSM_IN, ".weight", PLAIN), "in_proj.bias": (T.SSM_IN, ".bias", PLAIN),
    "conv1d.weight": (T.SSM_CONV1D, ".weight", CONV1D), "conv1d.bias": (T.SSM_CONV1D, ".bias", PLAIN),
    "dt_bias": (T.SSM_DT, ".bias", PLAIN), "A_log": (T.SSM_A, "", SSM_A), "D": (T.SSM_D, "", COLUMN),
    "norm.weight": (T.SSM_NORM, ".weight", GROUPED),
    "out_proj.weight": (T.SSM_OUT, ".weight", PLAIN), "out_proj.bias": (T.SSM_OUT, ".bias", PLAIN),
    "gate.weight": (T.FFN_GATE_INP, ".weight", PLAIN),
    "gate.e_score_correction_bias": (T.FFN_EXP_PROBS_B, ".bias", PLAIN),
    "experts.up_proj": (T.FFN_UP_EXP, ".weight", PLAIN), "experts.down_proj": (T.FFN_DOWN_EXP, ".weight", PLAIN),
    "fc1_latent_proj.weight": (T.MOE_LATENT_DOWN, ".weight", PLAIN),
    "fc1_latent_proj.bias": (T.MOE_LATENT_DOWN, ".bias", PLAIN),
    "fc2_latent_proj.weight": (T.MOE_LATENT_UP, ".weight", PLAIN),
    "fc2_latent_proj.bias": (T.MOE_LATENT_UP, ".bias", PLAIN),
}
for _proj, _t in (("q_proj", T.ATTN_Q), ("k_proj", T.ATTN_K), ("v_proj", T.ATTN_V), ("o_proj", T.ATTN_OUT),
                  ("shared_experts.up_proj", T.FFN_UP_SHEXP), ("shared_experts.down_proj", T.FFN_DOWN_SHEXP),
                  ("up_proj", T.FFN_UP), ("down_proj", T.FFN_DOWN)):
    for _suffix in ("weight", "bias"):
        _MIXER[f"{_proj}.{_suffix}"] = (_t, f".{_suffix}", PLAIN)

_GLOBAL: dict[str, tuple[T, str, str]] = {
    "model.embeddings.weight": (T.TOKEN_EMBD, ".weight", PLAIN),
    "model.norm_f.weight": (T.OUTPUT_NORM, ".weight", PLAIN),
    "lm_head.weight": (T.OUTPUT, ".weight", PLAIN),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# tensors llama.cpp's converter always stores in F32 (besides 1-D tensors, norms and non-".weight" ones)
_F32_TENSORS = (T.FFN_GATE_INP, T.SSM_CONV1D)


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor of the layout."""
    param: str       # hylm parameter / buffer name
    name: str        # GGUF tensor name
    tensor: T        # its GGUF tensor kind
    transform: str   # PLAIN | CONV1D | SSM_A | COLUMN | GROUPED
    layer: int | None


def architecture(config: ModelConfig) -> str:
    return ARCH_MOE if MOE in config.pattern else ARCH_DENSE


def gguf_name(tensor: T, layer: int | None, suffix: str) -> str:
    return gguf.TENSOR_NAMES[tensor].format(bid=layer) + suffix


def tensor_spec(param: str) -> TensorSpec | None:
    """The GGUF tensor of a hylm parameter; None for parameters outside the layout (the MTP block)."""
    if param in _GLOBAL:
        t, suffix, transform = _GLOBAL[param]
        return TensorSpec(param, gguf_name(t, None, suffix), t, transform, None)
    m = _LAYER.match(param)
    if m is None:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if rest == "norm.weight":
        return TensorSpec(param, gguf_name(T.ATTN_NORM, layer, ".weight"), T.ATTN_NORM, PLAIN, layer)
    if not rest.startswith("mixer.") or rest[len("mixer."):] not in _MIXER:
        raise KeyError(f"{param}: no GGUF tensor for this parameter")
    t, suffix, transform = _MIXER[rest[len("mixer."):]]
    return TensorSpec(param, gguf_name(t, layer, suffix), t, transform, layer)


def layout(params: dict[str, tuple[int, ...]], arch: str) -> list[TensorSpec]:
    """The GGUF tensors of a model given its parameter shapes (name -> shape), in the model's order;
    checks that the architecture knows every tensor kind used."""
    allowed = set(gguf.MODEL_TENSORS[ARCHES[arch]])
    out = []
    for param in params:
        spec = tensor_spec(param)
        if spec is None:
            continue
        if spec.tensor not in allowed:
            raise ValueError(f"{param}: GGUF architecture {arch} has no tensor {spec.name}")
        out.append(spec)
    return out


def to_gguf(spec: TensorSpec, value: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A hylm parameter -> the tensor llama.cpp's converter writes for it (fp32)."""
    value = value.detach().float()
    if spec.transform == CONV1D:
        return value.reshape(value.shape[0], value.shape[-1])
    if spec.transform == SSM_A:
        return (-torch.exp(value)).reshape(-1, 1)
    if spec.transform == COLUMN:
        return value.reshape(-1, 1)
    if spec.transform == GROUPED:
        return value.reshape(config.n_groups, -1)
    return value


def gguf_shape(spec: TensorSpec, shape: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
    """Row-major shape of the GGUF tensor of a parameter of the given shape."""
    if spec.transform == CONV1D:
        return (shape[0], shape[-1])
    if spec.transform in (SSM_A, COLUMN):
        return (shape[0], 1)
    if spec.transform == GROUPED:
        return (config.n_groups, shape[0] // config.n_groups)
    return tuple(shape)


def from_gguf(spec: TensorSpec, value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A GGUF tensor (fp32, row-major) -> the hylm parameter of the given shape (fp32). Raises ValueError
    for an A that cannot come from -exp(A_log)."""
    if spec.transform == SSM_A:
        if not bool((value < 0).all()):
            raise ValueError(f"{spec.name}: A must be negative everywhere (it holds -exp(A_log))")
        value = torch.log(-value)
    return value.reshape(shape)


def stays_f32(spec: TensorSpec, ndim: int) -> bool:
    """llama.cpp's converter rule: 1-D tensors, norms, the router, conv weights and everything that is not a
    `.weight` (biases, ssm_a, ssm_d) stay F32 whatever the output type."""
    return (ndim <= 1 or spec.name.endswith("_norm.weight") or spec.tensor in _F32_TENSORS
            or not spec.name.endswith(".weight"))


def layer_arrays(config: ModelConfig) -> tuple[list[int], list[int]]:
    """(head_count_kv, feed_forward_length) per layer, as llama.cpp's converter writes them."""
    kv, ff = [], []
    for kind in config.pattern:
        kv.append(config.num_key_value_heads if kind == ATTENTION else 0)
        ff.append(config.moe_intermediate_size if kind == MOE else config.intermediate_size if kind == MLP else 0)
    return kv, ff


def kinds_from_arrays(head_count_kv: list[int], feed_forward_length: list[int],
                      is_moe: Callable[[int], bool]) -> str:
    """The layer pattern llama.cpp derives from the per-layer arrays. Which FFN layers are MoE is
    `is_moe(layer)`: llama.cpp makes all of them MoE when the file has experts; hylm asks whether the
    layer has a router, which agrees on llama.cpp's files and also reads models mixing both kinds."""
    out = []
    for i, (kv, ff) in enumerate(zip(head_count_kv, feed_forward_length)):
        if kv == 0 and ff == 0:
            out.append(MAMBA)
        elif ff == 0:
            out.append(ATTENTION)
        else:
            out.append(MOE if is_moe(i) else MLP)
    return "".join(out)


__all__ = ["ARCH_MOE", "ARCH_DENSE", "ARCHES", "TensorSpec", "architecture", "tensor_spec", "layout", "to_gguf",
           "from_gguf", "gguf_shape", "stays_f32", "layer_arrays", "kinds_from_arrays"]
