"""Tiny random transformers Nemotron-H models and their checkpoints, in every layout hylm must read.

Shared by the parity tests: `CONFIGS` (NemotronHConfig kwargs), `make_hf_model` (a transformers model
with every tensor re-randomised to realistic, non-trivial values), `save_hf` (transformers' own
`save_pretrained`), `save_v5_stacked` (transformers v5's in-memory names: `model.` prefix, routed experts
stacked 3-D) and `resave_nvidia_style` (NVIDIA's release layout: `backbone.` prefix, one tensor per
expert, sharded with an index, legacy config keys).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_KIND_NAMES = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}


def layers(pattern: str) -> list[str]:
    return [_KIND_NAMES[c] for c in pattern]


# Each config is tiny (< 1M parameters) and together they cover: every layer kind (M * E -), latent and
# non-latent MoE, grouped routing (n_group > 1 with topk_group), GQA ratios 1/2/4, Mamba n_groups 1/2/4,
# odd sizes, unnormalised top-k, no conv bias, conv kernels 3/4, and chunk sizes 8 and 5 (the tests use
# sequence lengths that are and are not multiples of them).
CONFIGS: dict[str, dict[str, Any]] = {
    # every kind, latent MoE, GQA 2, Mamba groups 2, odd sizes (hidden 36, head_dim 12, vocab 97, P 6)
    "all_kinds_latent": dict(
        vocab_size=97, hidden_size=36, layers_block_type=layers("M*E-ME"),
        num_attention_heads=6, num_key_value_heads=3, head_dim=12,
        intermediate_size=29,
        mamba_num_heads=6, mamba_head_dim=6, ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=8,
        n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=21,
        moe_shared_expert_intermediate_size=23, moe_latent_size=14, routed_scaling_factor=2.5,
    ),
    # non-latent MoE with group-limited routing (3 groups of 4, keep 2), GQA 4, chunk 5, Mamba groups 1
    "grouped_routing_gqa4": dict(
        vocab_size=101, hidden_size=32, layers_block_type=layers("*EM*EM"),
        num_attention_heads=4, num_key_value_heads=1, head_dim=10,
        mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=6, n_groups=1, conv_kernel=4, chunk_size=5,
        n_routed_experts=12, num_experts_per_tok=4, n_group=3, topk_group=2, moe_intermediate_size=19,
        moe_shared_expert_intermediate_size=17, moe_latent_size=None, routed_scaling_factor=1.5,
    ),
    # MHA (GQA 1), Mamba-heavy with 4 groups, kernel 3, no conv bias, latent MoE with 2 groups keep 1 and
    # unnormalised top-k weights, dense MLP
    "mamba_groups4_mha": dict(
        vocab_size=83, hidden_size=24, layers_block_type=layers("MM*-EM"),
        num_attention_heads=4, num_key_value_heads=4, head_dim=6,
        intermediate_size=37,
        mamba_num_heads=8, mamba_head_dim=4, ssm_state_size=12, n_groups=4, conv_kernel=3,
        use_conv_bias=False, chunk_size=8,
        n_routed_experts=6, num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=False,
        moe_intermediate_size=15, moe_shared_expert_intermediate_size=11, moe_latent_size=10,
    ),
}

# Per config: a length that is not a multiple of chunk_size, and one that is (both span several chunks).
def seq_lens(kwargs: dict[str, Any]) -> tuple[int, int]:
    q = kwargs["chunk_size"]
    return 2 * q + 3, 3 * q


def make_hf_model(kwargs: dict[str, Any], seed: int = 0):
    """transformers' NemotronHForCausalLM in fp32 eval mode, every parameter and buffer re-randomised."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    # eager experts: transformers' default grouped_mm needs 16-byte aligned strides, which odd sizes lack on CPU
    config = NemotronHConfig(**kwargs, experts_implementation="eager", attn_implementation="eager")
    model = NemotronHForCausalLM(config).float().eval()
    randomise_(model, seed)
    fix_time_step_limit_(model)
    return model


def fix_time_step_limit_(model) -> None:
    """transformers sets `mixer.time_step_limit = (config.time_step_min, inf)` and applies it only in its
    chunked (prefill) path, not in its one-token path, so its own prefill and decode disagree. hylm follows
    NVIDIA's reference / mamba_ssm: the configured limit, (0, inf), in both paths. Give transformers the
    same limit so both compute the same math."""
    for module in model.modules():
        if hasattr(module, "time_step_limit") and hasattr(module, "A_log"):
            module.time_step_limit = (0.0, float("inf"))


@torch.no_grad()
def randomise_(model, seed: int) -> None:
    """Realistic non-trivial values for every tensor; fails on a tensor it has no rule for."""
    g = torch.Generator().manual_seed(seed + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name, t in tensors.items():
        shape = t.shape
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            value = 1.0 + 0.2 * randn(*shape)  # RMSNorm weights, incl. the Mamba gated norm
        elif name.endswith("mixer.A_log"):
            value = torch.log(0.5 + 7.5 * rand(*shape))  # A = -exp(A_log) in [-8, -0.5]
        elif name.endswith("mixer.D"):
            value = randn(*shape)
        elif name.endswith("mixer.dt_bias"):
            # softplus(dt_bias) log-uniform in [1e-3, 1e-1]; dt_bias = inverse softplus
            dt = torch.exp(math.log(1e-3) + (math.log(1e-1) - math.log(1e-3)) * rand(*shape))
            value = dt + torch.log(-torch.expm1(-dt))
        elif name.endswith("e_score_correction_bias"):
            value = 0.1 * randn(*shape)
        elif name.endswith("conv1d.weight"):  # [C, 1, K]
            value = randn(*shape) / math.sqrt(shape[-1])
        elif name.endswith(".bias"):
            value = 0.1 * randn(*shape)
        elif name.endswith("embeddings.weight"):
            value = randn(*shape)
        elif name.endswith(".weight") or name.endswith("experts.up_proj") or name.endswith("experts.down_proj"):
            # Linear [out, in] or stacked experts [E, out, in]: N(0, 1/fan_in) keeps activations O(1)
            value = randn(*shape) / math.sqrt(shape[-1])
        else:
            raise AssertionError(f"randomise_: no rule for tensor {name} {tuple(shape)}")
        t.copy_(value.to(t.dtype))


def save_hf(model, directory: str | Path) -> Path:
    """transformers' own `save_pretrained` (safetensors; in v5 it writes NVIDIA's tensor names back)."""
    directory = Path(directory)
    model.save_pretrained(str(directory))
    return directory


def save_v5_stacked(model, directory: str | Path) -> Path:
    """transformers v5's in-memory layout, written as is: `model.` prefix, routed experts stacked 3-D
    (`mixer.experts.up_proj` [E, I, D_in], `mixer.experts.down_proj` [E, D_in, I]), config with
    `layers_block_type`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(directory))
    tensors = {n: t.detach().contiguous().clone() for n, t in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def read_checkpoint(directory: str | Path) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(directory / f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


_STACKED = re.compile(r"^(.*\.mixer\.experts)\.(up_proj|down_proj)$")

# new (transformers v5) config key -> NVIDIA's legacy key
_LEGACY = {
    "n_groups": "mamba_n_groups", "conv_kernel": "mamba_d_conv", "expand": "mamba_expand",
    "time_step_min": "mamba_dt_min", "time_step_max": "mamba_dt_max", "time_step_limit": "mamba_dt_limit",
    "use_conv_bias": "mamba_conv_bias", "chunk_size": "mamba_chunk_size",
}


def nvidia_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any layout -> NVIDIA's names: `backbone.` prefix, `mixer.experts.{e}.{up,down}_proj.weight`."""
    out = {}
    for name, t in tensors.items():
        if name.startswith("model."):
            name = "backbone." + name[len("model."):]
        m = _STACKED.match(name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e].contiguous().clone()
        else:
            out[name] = t.contiguous()
    return out


def legacy_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A transformers v5 config.json dict -> the keys of NVIDIA's original release configs."""
    cfg = dict(cfg)
    for new, old in _LEGACY.items():
        if new in cfg:
            cfg[old] = cfg.pop(new)
    kinds = {v: k for k, v in _KIND_NAMES.items()}
    blocks = cfg.pop("layers_block_type")
    cfg["hybrid_override_pattern"] = "".join(kinds[b] for b in blocks)
    cfg["num_hidden_layers"] = len(blocks)
    mtp = cfg.pop("mtp_layers_block_type", None)
    if mtp:
        cfg["mtp_hybrid_override_pattern"] = "".join(kinds[b] for b in mtp)
    if isinstance(cfg.get("mamba_dt_limit"), list):  # plain JSON numbers, as NVIDIA writes them
        cfg["mamba_dt_limit"] = [float(v["__float__"]) if isinstance(v, dict) else v for v in cfg["mamba_dt_limit"]]
    cfg["architectures"] = ["NemotronHForCausalLM"]
    cfg["model_type"] = "nemotron_h"
    return cfg


def resave_nvidia_style(directory: str | Path, out_dir: str | Path, shards: int = 2) -> Path:
    """Rewrite a checkpoint the way NVIDIA's releases are: `backbone.` prefix, one tensor per routed
    expert ([I, D_in] up, [D_in, I] down), `shards` files `model-0000k-of-0000n.safetensors` with a
    `model.safetensors.index.json`, and config.json with the legacy keys."""
    directory, out_dir = Path(directory), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = nvidia_tensors(read_checkpoint(directory))
    names = sorted(tensors)
    per = math.ceil(len(names) / shards)
    weight_map, total = {}, 0
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k * per:(k + 1) * per]}
        save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg = json.loads((directory / "config.json").read_text())
    (out_dir / "config.json").write_text(json.dumps(legacy_config(cfg), indent=2))
    gen = directory / "generation_config.json"
    if gen.exists():
        shutil.copy(gen, out_dir / gen.name)
    return out_dir


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
