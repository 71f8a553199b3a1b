"""Loading a rank's model: only its shard of each tensor is read from the safetensors files
(`safe_open(...).get_slice`), so no rank ever holds, or reads, the whole checkpoint.

Both layouts hylm reads are accepted: NVIDIA's (`backbone.` prefix, one tensor per routed expert: an
expert-parallel rank opens only its own experts' tensors) and transformers v5's (`model.` prefix,
experts stacked 3-D: a slice of the stack is read).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig
from ..loader import load_config, load_model, parse_dtype
from ..model import NemotronHModel
from ..weights.errors import CheckpointError, tensor_problems
from ..weights.hf_safetensors import canonical_name, checkpoint_files
from .group import Communicator
from .layers import build_local_model, fill_, finish_, shard_model
from .sharding import ParallelLayout, Shard, shard_spec

_PER_EXPERT = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


@dataclass
class LoadReport:
    bytes_read: int = 0  # tensor bytes this rank read from the files (in their stored dtype)
    tensors_read: int = 0


def _read(handle, stored: str, path: Path, dim: int, ranges) -> torch.Tensor:
    """The concatenation along `dim` of ranges [lo, hi) of a stored tensor (all of it when ranges is None)."""
    try:
        sl = handle.get_slice(stored)
        if ranges is None:
            return sl[:]
        lead = (slice(None),) * dim
        return torch.cat([sl[lead + (slice(lo, hi),)] for lo, hi in ranges], dim=dim)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read tensor {stored}, file truncated or corrupt ({e})") from None


def load_sharded_checkpoint(model: NemotronHModel, directory: str | os.PathLike, config: ModelConfig,
                            layout: ParallelLayout, dtype: torch.dtype, device: torch.device | str) -> LoadReport:
    """Fill a rank's meta-device model (from build_local_model) with its shards of the checkpoint."""
    directory = Path(directory)
    from ..weights.modelopt import read_quant_config

    if read_quant_config(directory) is not None:
        raise CheckpointError(f"{directory}: quantized (ModelOpt) checkpoints cannot be split across ranks yet")
    # full shapes, to check the files against (the MTP block is not used across ranks)
    with torch.device("meta"):
        full = NemotronHModel(config.replace(num_nextn_predict_layers=0, mtp_pattern=""))
    full_shapes = {n: tuple(t.shape) for n, t in list(full.named_parameters()) + list(full.named_buffers())}

    handles, sources, experts, unexpected = {}, {}, {}, []
    for path in checkpoint_files(directory):
        try:
            handles[path] = h = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None
        for stored in h.keys():
            name = canonical_name(stored)
            m = _PER_EXPERT.match(name)
            if m and f"{m.group(1)}.{m.group(3)}" in full_shapes:
                experts.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = (path, stored)
            elif name in full_shapes:
                sources[name] = (path, stored)
            elif not name.startswith("mtp."):
                unexpected.append(stored)
    if config.tie_word_embeddings and "lm_head.weight" not in sources and "model.embeddings.weight" in sources:
        sources["lm_head.weight"] = sources["model.embeddings.weight"]

    missing, wrong_shape = [], []
    for name, want in full_shapes.items():
        if name in sources:
            path, stored = sources[name]
            got = tuple(handles[path].get_slice(stored).get_shape())
            if got != want:
                wrong_shape.append(f"{stored}: checkpoint {list(got)} vs model {list(want)}")
        elif name in experts:
            parts = experts[name]
            for e in range(want[0]):
                if e not in parts:
                    missing.append(f"{name.rsplit('.', 1)[0]}.{e}.{name.rsplit('.', 1)[1]}.weight")
                    continue
                got = tuple(handles[parts[e][0]].get_slice(parts[e][1]).get_shape())
                if got != want[1:]:
                    wrong_shape.append(f"{parts[e][1]}: checkpoint {list(got)} vs model {list(want[1:])}")
        elif not name.endswith("e_score_correction_bias"):  # older checkpoints lack it: zeros
            missing.append(name)
    problems = tensor_problems(missing, unexpected, wrong_shape)
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match its config:\n  " + "\n  ".join(problems))

    report = LoadReport()
    local: dict[str, torch.Tensor] = {}
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, ref in named:
        spec = shard_spec(name, config, layout)
        keep_fp32 = name.endswith("e_score_correction_bias")  # routing stays exact in any dtype
        target = torch.float32 if keep_fp32 else dtype
        shape = spec.local_shape(full_shapes[name])
        if spec.zeros or (name not in sources and name not in experts):
            value = torch.zeros(shape, dtype=target, device=device)
        elif name in sources:
            value = _read(handles[sources[name][0]], sources[name][1], sources[name][0], spec.dim, spec.ranges)
        else:
            value = _read_experts(handles, experts[name], full_shapes[name][0], spec)
        if not spec.zeros and (name in sources or name in experts):
            report.bytes_read += value.numel() * value.element_size()
            report.tensors_read += 1
        local[name] = value.to(device=device, dtype=target)
    fill_(model, local)
    return report


def _read_experts(handles, parts: dict[int, tuple[Path, str]], num_experts: int, spec: Shard) -> torch.Tensor:
    """A rank's part of a stacked expert tensor [E, ...] stored one tensor per expert: the owned experts
    (expert parallelism: spec along dim 0), or a slice of every expert (tensor parallelism)."""
    if spec.ranges is not None and spec.dim == 0:
        chosen, inner = [e for lo, hi in spec.ranges for e in range(lo, hi)], (0, None)
    else:
        chosen, inner = list(range(num_experts)), (spec.dim - 1, spec.ranges)
    return torch.stack([_read(handles[parts[e][0]], parts[e][1], parts[e][0], *inner) for e in chosen])


def load_parallel_model(model: str | os.PathLike | ModelConfig, layout: ParallelLayout, comm: Communicator,
                        dtype: str | torch.dtype = torch.float32, seed: int = 0,
                        model_class: type[NemotronHModel] = NemotronHModel) -> tuple[NemotronHModel, LoadReport]:
    """A rank's model from a checkpoint directory (its shards only), or from a preset / config with
    random weights (built whole with `seed`, the same on every rank, then cut)."""
    dtype = parse_dtype(dtype)
    device = comm.device
    if isinstance(model, ModelConfig) or not Path(model).is_dir():
        full = load_model(model, dtype=dtype, device=device, seed=seed)
        return shard_model(full, layout, comm, model_class), LoadReport()
    config = load_config(model)
    local = build_local_model(config, layout, comm, model_class)
    report = load_sharded_checkpoint(local, model, config, layout, dtype, device)
    return finish_(local), report
