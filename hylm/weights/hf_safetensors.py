"""HF-layout safetensors checkpoints (single file or sharded) -> NemotronHModel parameters.

Accepts NVIDIA's layout (`backbone.` prefix, one tensor per routed expert) and transformers v5's
(`model.` prefix, routed experts stacked as 3-D tensors). The model is built on the meta device and
each parameter is materialised once, straight from the file into its final dtype and device.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError, tensor_problems

_PER_EXPERT = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")
_PICKLED = ("pytorch_model.bin", "model.pt", "model.pth", "pytorch_model.bin.index.json")


def canonical_name(name: str) -> str:
    """Checkpoint tensor name -> hylm parameter name (before expert stacking)."""
    if name.startswith("backbone."):
        return "model." + name[len("backbone."):]
    return name


def checkpoint_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return files
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickled = [p for p in _PICKLED if (directory / p).exists()]
    if pickled:
        raise CheckpointError(f"{directory}: only safetensors checkpoints are supported, found {pickled[0]} "
                              "(hylm never unpickles weights; convert it to safetensors)")
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json found")


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def load_hf_checkpoint(model: torch.nn.Module, directory: str | os.PathLike, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> None:
    """Fill `model` (built on the meta device) with the checkpoint's tensors, in place.

    Raises one CheckpointError listing every missing, unexpected and mis-shaped tensor.
    """
    directory = Path(directory)
    from .modelopt import load_modelopt_checkpoint, read_quant_config  # NVFP4 / FP8 (ModelOpt) checkpoints
    qcfg = read_quant_config(directory)
    if qcfg is not None:
        return load_modelopt_checkpoint(model, directory, dtype=dtype, device=device, qcfg=qcfg)
    expected = {n: p for n, p in model.named_parameters()}
    expected.update({n: b for n, b in model.named_buffers()})
    has_mtp = any(n.startswith("mtp.") for n in expected)

    # name -> (file, stored name) or, for per-expert tensors, name -> {expert: (file, stored name)}
    sources: dict[str, tuple[Path, str]] = {}
    experts: dict[str, dict[int, tuple[Path, str]]] = {}
    unexpected: list[str] = []
    handles = {}
    for path in checkpoint_files(directory):
        handles[path] = f = _open(path)
        for stored in f.keys():
            name = canonical_name(stored)
            m = _PER_EXPERT.match(name)
            if m:
                experts.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = (path, stored)
            elif name in expected:
                sources[name] = (path, stored)
            elif name.startswith("mtp.") and not has_mtp:
                continue  # the config has no MTP block: ignore its weights, as transformers does
            else:
                unexpected.append(stored)
    for stacked in list(experts):
        if stacked not in expected:
            unexpected.extend(stored for _, stored in experts.pop(stacked).values())

    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" not in sources and "model.embeddings.weight" in sources:
        sources["lm_head.weight"] = sources["model.embeddings.weight"]
    # buffers with a well-defined default when absent (older checkpoints lack the correction bias)
    optional = {n for n in expected if n.endswith("e_score_correction_bias")}

    missing, wrong_shape = [], []
    for name, param in expected.items():
        want = tuple(param.shape)
        if name in sources:
            path, stored = sources[name]
            got = tuple(handles[path].get_slice(stored).get_shape())
            if got != want:
                wrong_shape.append(f"{stored}: checkpoint {list(got)} vs model {list(want)}")
        elif name in experts:
            parts = experts[name]
            absent = [e for e in range(want[0]) if e not in parts]
            if absent:
                missing.extend(f"{name.rsplit('.', 1)[0]}.{e}.{name.rsplit('.', 1)[1]}.weight" for e in absent)
            for e, (path, stored) in sorted(parts.items()):
                got = tuple(handles[path].get_slice(stored).get_shape())
                if e >= want[0] or got != want[1:]:
                    wrong_shape.append(f"{stored}: checkpoint {list(got)} vs model {list(want[1:])} "
                                       f"(expert {e} of {want[0]})")
        elif name not in optional:
            missing.append(name)
    problems = tensor_problems(missing, unexpected, wrong_shape)
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match its config:\n  " + "\n  ".join(problems))

    def read(path: Path, stored: str) -> torch.Tensor:
        try:
            return handles[path].get_tensor(stored)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {stored}, file truncated or corrupt ({e})") from None

    for name, param in expected.items():
        keep_fp32 = name.endswith("e_score_correction_bias")  # routing stays exact in any dtype
        target = torch.float32 if keep_fp32 or not param.dtype.is_floating_point else dtype
        if name in sources:
            value = read(*sources[name]).to(device=device, dtype=target)
        elif name in experts:
            value = torch.empty(param.shape, dtype=target, device=device)
            for e, src in experts[name].items():
                value[e].copy_(read(*src))
        else:
            value = torch.zeros(param.shape, dtype=target, device=device)
        _set(model, name, value)


def _set(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
    else:
        setattr(module, attr, value)
