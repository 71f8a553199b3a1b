"""Write a quantised model as an NVIDIA ModelOpt-layout checkpoint, and `hylm quantize`'s driver.

The checkpoint: safetensors (sharded with an index above `max_shard_bytes`) with NVIDIA's names
(`backbone.` prefix, one tensor per routed expert: `backbone.layers.{i}.mixer.experts.{e}.up_proj.weight`);
per quantised module `X.weight` (uint8 packed NVFP4 or float8_e4m3fn), `X.weight_scale` (float8_e4m3fn
[out, in/16] for NVFP4, f32 scalar for FP8), `X.weight_scale_2` (f32 scalar, NVFP4 only), `X.input_scale`
(f32 scalar); the rest in `dtype` (bf16 by default; the router's correction bias stays fp32).
config.json gets `quantization_config` {"quant_method": "modelopt", "quant_algo": "NVFP4" | "FP8" |
"MIXED_PRECISION", "kv_cache_quant_algo": null, "group_size": 16 (with NVFP4), "exclude_modules": [...],
"quantized_layers": {...} (MIXED_PRECISION)}; hf_quant_config.json holds the same section under
"quantization", with a "producer".
"""

from __future__ import annotations

import json
import os
import shutil
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..model.moe import Experts
from ..model.quantized import (FP8, NVFP4, PROJECTIONS, QUANTIZED_MODULES, QuantizedExperts, _QuantizedLinear,
                               calibrate_input_amax, checkpoint_name, expert_module_name, quantize_model,
                               quantized_modules, resolve_policy)

_ALGO_NAME = {NVFP4: "NVFP4", FP8: "FP8"}
DEFAULT_SHARD_BYTES = 5 * 10**9
# files besides the weights that a quantised checkpoint keeps from its source
_COPIED = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "generation_config.json", "chat_template*",
           "*.jinja", "vocab*", "merges.txt", "*.tiktoken", "tokenizer.model")


def module_formats(model: nn.Module) -> dict[str, str | None]:
    """Checkpoint module name -> "nvfp4" | "fp8" | None (dense) for every Linear layer and routed expert
    projection of the model."""
    out: dict[str, str | None] = {}
    for name, module in model.named_modules():
        if isinstance(module, _QuantizedLinear):
            out[checkpoint_name(name)] = module.fmt
        elif isinstance(module, nn.Linear):
            out[checkpoint_name(name)] = None
        elif isinstance(module, (QuantizedExperts, Experts)):
            e = module.num_experts if isinstance(module, QuantizedExperts) else module.up_proj.shape[0]
            for proj in PROJECTIONS:
                fmt = module.formats[proj] if isinstance(module, QuantizedExperts) else None
                for k in range(e):
                    out[expert_module_name(name, k, proj)] = fmt
    return out


def _compress_experts(names: list[str]) -> list[str]:
    """Dense expert projections listed per expert -> one `<layer>.mixer.experts.*.<proj>` pattern each."""
    out, seen = [], set()
    for n in names:
        parts = n.split(".")
        if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
            pattern = ".".join(parts[:-2] + ["*", parts[-1]])
            if pattern not in seen:
                seen.add(pattern)
                out.append(pattern)
        else:
            out.append(n)
    return out


def quantization_section(model: nn.Module) -> dict[str, Any]:
    """The ModelOpt quantization section describing the model's packed modules."""
    formats = module_formats(model)
    used = {f for f in formats.values() if f is not None}
    if not used:
        raise ValueError("the model has no quantised module: nothing to describe")
    dense = [n for n, f in formats.items() if f is None]
    # a dense expert projection is excluded by a pattern; make sure it does not also cover a packed one
    excluded = _compress_experts(dense)
    packed = [n for n, f in formats.items() if f is not None]
    if any(fnmatchcase(n, p) for p in excluded if "*" in p for n in packed):
        excluded = dense
    section: dict[str, Any] = {"quant_algo": _ALGO_NAME[next(iter(used))] if len(used) == 1 else "MIXED_PRECISION",
                               "kv_cache_quant_algo": None}
    if NVFP4 in used:
        section["group_size"] = 16
    section["exclude_modules"] = excluded
    if len(used) > 1:
        section["quantized_layers"] = {
            n: ({"quant_algo": "NVFP4", "group_size": 16} if f == NVFP4 else {"quant_algo": "FP8"})
            for n, f in formats.items() if f is not None}
    return section


def _checkpoint_tensors(model: nn.Module, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """(NVIDIA name, tensor) pairs; dense floating tensors in dtype, packed ones and scales as they are."""
    experts = {n for n, m in model.named_modules() if isinstance(m, (Experts, QuantizedExperts))}
    keep = set()
    for mname, module in quantized_modules(model).items():
        keep.update(f"{mname}.{b}" for b, _ in module.named_buffers(recurse=False))
    out = []
    for name, t in model.state_dict().items():
        if name not in keep and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        module, _, attr = name.rpartition(".")
        if module in experts:
            proj = "up_proj" if attr.startswith("up_proj") else "down_proj"
            suffix = attr[len(proj):].lstrip("_") or "weight"
            for k in range(t.shape[0]):
                out.append((f"{expert_module_name(module, k, proj)}.{suffix}", t[k].contiguous()))
            continue
        out.append((checkpoint_name(name), t.contiguous()))
    return out


def save_modelopt_checkpoint(model: nn.Module, directory: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                             max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = False,
                             producer: str | None = None) -> dict[str, Any]:
    """Write config.json (+ quantization_config), hf_quant_config.json and the safetensors files of a
    model with packed modules. Returns the quantization section."""
    from tqdm import tqdm

    from .. import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    section = quantization_section(model)
    tensors = _checkpoint_tensors(model, dtype)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    for stale in list(directory.glob("*.safetensors")) + [directory / "model.safetensors.index.json"]:
        if stale.exists():
            stale.unlink()
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=not progress) as bar:
        for fname, shard in zip(names, shards):
            save_file({n: t for n, t in shard}, str(directory / fname), metadata={"format": "pt"})
            for n, t in shard:
                weight_map[n] = fname
            bar.update(sum(t.numel() * t.element_size() for _, t in shard))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    cfg = model.config.to_hf_dict()
    cfg.pop("quantization_config", None)
    cfg["quantization_config"] = {"quant_method": "modelopt", **section}
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    hf_quant = {"producer": {"name": "modelopt", "version": producer or f"hylm-{__version__}"},
                "quantization": section}
    (directory / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2) + "\n")
    return section


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    src, dst = Path(src), Path(dst)
    copied = []
    if not src.is_dir():
        return copied
    for f in sorted(src.iterdir()):
        if f.is_file() and any(fnmatchcase(f.name, p) for p in _COPIED):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def quantize_checkpoint(model_path: str | os.PathLike, out: str | os.PathLike, fmt: str = "nvfp4",
                        dtype: str | torch.dtype = "bf16", calib_tokens: int = 0, seed: int = 0,
                        max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
                        nvfp4_scale_search: bool = False) -> dict[str, Any]:
    """Load a model (directory or preset), quantise it with a preset policy ("nvfp4", "fp8", "mixed") and
    write a ModelOpt checkpoint to `out` (tokenizer files copied). calib_tokens > 0 runs that many
    random tokens through the dense model first to record activation amax for `input_scale`
    (otherwise 1.0). nvfp4_scale_search: least-squares NVFP4 block scales (hylm.ops.nvfp4). Returns a
    summary."""
    from tqdm import tqdm

    from ..loader import load_model, parse_dtype

    dtype = parse_dtype(dtype)
    model = load_model(model_path, dtype=dtype, seed=seed)
    policy = resolve_policy(fmt, model.config)
    amax = None
    if calib_tokens > 0:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, model.config.vocab_size, (1, calib_tokens), generator=g)
        amax = calibrate_input_amax(model, ids)

    def bar(items):
        return tqdm(items, desc=f"quantizing ({fmt})", unit="module", disable=not progress)

    quantize_model(model, policy, input_amax=amax, progress=bar, nvfp4_scale_search=nvfp4_scale_search)
    section = save_modelopt_checkpoint(model, out, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress)
    copied = copy_tokenizer_files(model_path, out)
    formats = module_formats(model)
    counts = {k: sum(1 for f in formats.values() if f == v) for k, v in (("nvfp4", NVFP4), ("fp8", FP8),
                                                                           ("dense", None))}
    return {"quant_algo": section["quant_algo"], "modules": counts, "copied": copied,
            "weight_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values())}


__all__ = ["save_modelopt_checkpoint", "quantization_section", "module_formats", "quantize_checkpoint",
           "copy_tokenizer_files", "QUANTIZED_MODULES"]
