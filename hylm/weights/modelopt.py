"""NVIDIA ModelOpt checkpoints (NVFP4, FP8 per-tensor, MIXED_PRECISION) -> a model with packed modules.

The quantization config comes from config.json's `quantization_config` and/or `hf_quant_config.json`'s
`quantization` section (both read; config.json wins where they disagree):
  quant_algo "NVFP4" | "FP8": every Linear layer and routed expert is quantised in that format, except the
    modules matched by `exclude_modules`;
  quant_algo "MIXED_PRECISION": the modules matched by `quantized_layers` ({module: {"quant_algo":
    "NVFP4" | "FP8"}}) are quantised in their format (minus `exclude_modules`), the rest is dense.
Module names are checkpoint names (`backbone.layers.3.mixer.in_proj`, `backbone.layers.1.mixer.experts.0.
up_proj`, `lm_head`); `model.`-prefixed spellings and fnmatch patterns (`*mixer.experts*`) also match.
The MTP block is dense unless the config quantises it AND its tensors are stored packed (NVIDIA stores
it bf16 whatever the config says). `kv_cache_quant_algo` is accepted and ignored (the CPU KV cache keeps
the model dtype), as are `k_scale` / `v_scale` tensors.

Loading: the model (built on the meta device) gets NVFP4Linear / FP8Linear / QuantizedExperts in place of
the modules the config quantises; every tensor is then read once from the files: packed weights and
their scales keep their stored dtype (uint8, float8_e4m3fn, float32), the dense remainder is converted
to the requested dtype. Problems (missing, unexpected, mis-shaped tensors, wrong dtypes, an unusable
config) are reported together in one CheckpointError.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

from ..model.moe import Experts
from ..model.quantized import (FP8, NVFP4, QUANTIZED_LINEAR, QUANTIZED_MODULES, QuantizedExperts, _replace,
                               checkpoint_name, nvfp4_capable)
from .errors import CheckpointError
from .errors import format_names as _fmt, tensor_problems
from .hf_safetensors import _set, canonical_name, checkpoint_files

ALGOS = {"NVFP4": NVFP4, "FP8": FP8}
SUPPORTED_ALGOS = ("NVFP4", "FP8", "MIXED_PRECISION")
HF_QUANT_CONFIG = "hf_quant_config.json"

# per-expert tensors: <layer>.mixer.experts.<e>.<proj>.<weight | weight_scale | weight_scale_2 | input_scale>
_PER_EXPERT = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\."
                         r"(weight|weight_scale|weight_scale_2|input_scale)$")
_IGNORED_SUFFIXES = (".k_scale", ".v_scale")  # FP8 KV-cache scales: unused by the CPU KV cache
_ST_DTYPES = {torch.uint8: "U8", torch.float8_e4m3fn: "F8_E4M3"}
_FLOAT_ST = {"F16", "BF16", "F32", "F64"}
_PACKED_ST = {"U8", "F8_E4M3", "F8_E5M2"}


_ST_TORCH = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
             "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class SafetensorsReader:
    """Reads a safetensors file's tensors straight into caller-owned buffers (os.pread, no mmap).

    safetensors' own reader hands out views of a file mapping, which keeps every page it touched
    resident (and the file mapped) for as long as a tensor lives; reading into the final buffer keeps
    exactly one copy of each packed tensor and no mapping."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e})") from None
        try:
            size = os.fstat(self.fd).st_size
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(os.pread(self.fd, n, 8))
            header.pop("__metadata__", None)
            self.base = 8 + n
            self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
            for name, info in header.items():
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
                if dtype not in _ST_TORCH:
                    raise ValueError(f"tensor {name}: unsupported dtype {dtype}")
                if end - begin != math.prod(shape) * _ST_TORCH[dtype].itemsize or self.base + end > size:
                    raise ValueError(f"tensor {name}: data range {begin}..{end} does not fit its shape or the file")
                self.entries[name] = (dtype, shape, begin, end)
        except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
            os.close(self.fd)
            raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` (contiguous, CPU, the stored dtype and element count) with the tensor's bytes."""
        dtype, _, begin, end = self.entries[name]
        assert out.is_contiguous() and out.dtype == _ST_TORCH[dtype] and out.numel() * out.element_size() == end - begin
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < end - begin:
            n = os.preadv(self.fd, [view[done:]], self.base + begin + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: cannot read tensor {name}, file truncated")
            done += n
        return out

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, _, _ = self.entries[name]
        return self.read_into(name, torch.empty(shape, dtype=_ST_TORCH[dtype]))

    def close(self) -> None:
        os.close(self.fd)


# ---- the quantization config ------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


def read_quant_config(directory: str | os.PathLike) -> dict | None:
    """The checkpoint's ModelOpt quantization section, or None for an unquantised checkpoint.

    Raises CheckpointError for a quantization this loader does not support."""
    directory = Path(directory)
    from_config = from_hf = None
    cfg_file = directory / "config.json"
    if cfg_file.is_file():
        from_config = _read_json(cfg_file).get("quantization_config")
        if from_config is not None and not isinstance(from_config, dict):
            raise CheckpointError(f"{cfg_file}: quantization_config must be an object")
    hf_file = directory / HF_QUANT_CONFIG
    if hf_file.is_file():
        from_hf = _read_json(hf_file).get("quantization")
        if not isinstance(from_hf, dict):
            raise CheckpointError(f"{hf_file}: expected a 'quantization' object")
    if from_config is None and from_hf is None:
        return None
    merged = {**(from_hf or {}), **(from_config or {})}
    method = str(merged.get("quant_method", "modelopt")).lower()
    if method != "modelopt":
        raise CheckpointError(f"{directory}: quantization method {method!r} is not supported (hylm loads NVIDIA "
                              f"ModelOpt checkpoints: quant_algo {', '.join(SUPPORTED_ALGOS)})")
    algo = str(merged.get("quant_algo") or "").upper()
    if algo not in SUPPORTED_ALGOS:
        raise CheckpointError(f"{directory}: ModelOpt quant_algo {merged.get('quant_algo')!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ALGOS)})")
    merged["quant_algo"] = algo
    group = merged.get("group_size")
    if group is not None and algo != "FP8" and str(group) != "16":
        raise CheckpointError(f"{directory}: NVFP4 group_size {group} is not supported (NVFP4 blocks are 16)")
    return merged


class _Patterns:
    """Module-name patterns: exact names by dict lookup, fnmatch patterns by scanning (few)."""

    def __init__(self, patterns: dict[str, object]):
        self.exact: dict[str, object] = {}
        self.wild: list[tuple[str, object]] = []
        for p, v in patterns.items():
            if any(c in p for c in "*?["):
                self.wild.append((p, v))
            else:
                self.exact[p] = v

    def lookup(self, names: list[str]) -> tuple[bool, object]:
        for n in names:
            if n in self.exact:
                return True, self.exact[n]
        for p, v in self.wild:
            if any(fnmatchcase(n, p) for n in names):
                return True, v
        return False, None


class QuantSpec:
    """A parsed quantization section: `format_of(names)` -> "nvfp4" | "fp8" | None for one module."""

    def __init__(self, qcfg: dict):
        self.algo = qcfg["quant_algo"]
        exclude = qcfg.get("exclude_modules") or []
        if isinstance(exclude, str):
            exclude = [exclude]
        self.exclude = _Patterns({p: True for p in exclude})
        layers = qcfg.get("quantized_layers") or {}
        if self.algo == "MIXED_PRECISION" and not isinstance(layers, dict):
            raise CheckpointError("MIXED_PRECISION quantization_config needs a quantized_layers object")
        self.layers = _Patterns(layers)
        self.problems: list[str] = []

    def format_of(self, names: list[str]) -> str | None:
        if self.exclude.lookup(names)[0]:
            return None
        if self.algo in ALGOS:
            return ALGOS[self.algo]
        found, entry = self.layers.lookup(names)
        if not found:
            return None
        algo = str((entry or {}).get("quant_algo", "") if isinstance(entry, dict) else entry).upper()
        if algo not in ALGOS:
            self.problems.append(f"{names[0]}: quant_algo {algo!r} is not supported (NVFP4 or FP8)")
            return None
        return ALGOS[algo]


def _names(hylm_name: str) -> list[str]:
    """Spellings a config may use for a module: NVIDIA's `backbone.` and transformers' `model.`."""
    if hylm_name.startswith("model."):
        return ["backbone." + hylm_name[len("model."):], hylm_name]
    return [hylm_name]


# ---- loading ----------------------------------------------------------------------------------------------

def plan_from_config(model: nn.Module, spec: QuantSpec, stored_dtype) -> dict[str, str | tuple]:
    """hylm module name -> format (Linear) or (up, down) formats (Experts), for the modules to quantise.

    stored_dtype(checkpoint tensor name) -> its safetensors dtype string or None (decides MTP modules)."""
    plan: dict[str, str | tuple] = {}

    def packed_in_file(names: list[str]) -> bool:
        return any(stored_dtype(n + ".weight") in _PACKED_ST for n in names)

    for name, module in model.named_modules():
        mtp = name.startswith("mtp.")
        if isinstance(module, nn.Linear):
            fmt = spec.format_of(_names(name))
            if fmt is not None and mtp and not packed_in_file(_names(name)):
                fmt = None
            if fmt == NVFP4 and not nvfp4_capable(module.in_features):
                spec.problems.append(f"{_names(name)[0]}: quantised as NVFP4 by the config but its input size "
                                     f"{module.in_features} is not a multiple of 16")
                fmt = None
            if fmt is not None:
                plan[name] = fmt
        elif isinstance(module, Experts):
            e, i, d = module.up_proj.shape
            fmts = []
            for proj, in_f in (("up_proj", d), ("down_proj", i)):
                per_expert = {}
                for k in range(e):
                    names = [f"{n}.{k}.{proj}" for n in _names(name)]
                    fmt = spec.format_of(names)
                    if fmt is not None and mtp and not packed_in_file(names):
                        fmt = None
                    per_expert.setdefault(fmt, k)
                if len(per_expert) > 1:
                    spec.problems.append(f"{_names(name)[0]}.*.{proj}: the experts mix formats "
                                         f"{sorted(map(str, per_expert))}, hylm needs one format per layer")
                fmt = next(iter(per_expert))
                if fmt == NVFP4 and not nvfp4_capable(in_f):
                    spec.problems.append(f"{_names(name)[0]}.*.{proj}: NVFP4 needs an input size that is a "
                                         f"multiple of 16, got {in_f}")
                    fmt = None
                fmts.append(fmt)
            if any(f is not None for f in fmts):
                plan[name] = (fmts[0], fmts[1])
    return plan


def apply_plan(model: nn.Module, plan: dict[str, str | tuple], device: torch.device | str = "meta",
               dtype: torch.dtype | None = None) -> None:
    """Swap the planned modules for empty packed modules (on `device`), in place."""
    for name, fmt in plan.items():
        module = model.get_submodule(name)
        if isinstance(fmt, str):
            new = QUANTIZED_LINEAR[fmt](module.in_features, module.out_features, module.bias is not None,
                                        dtype=dtype, device=device)
        else:
            e, i, d = module.up_proj.shape
            new = QuantizedExperts(e, d, i, fmt[0], fmt[1], dtype=dtype, device=device)
        _replace(model, name, new.requires_grad_(False))


def _same_shape(got: tuple, want: tuple) -> bool:
    return got == want or (want == () and got == (1,))


def load_modelopt_checkpoint(model: nn.Module, directory: str | os.PathLike, dtype: torch.dtype,
                             device: torch.device | str = "cpu", qcfg: dict | None = None) -> None:
    """Fill `model` (built on the meta device) from a ModelOpt checkpoint, swapping in packed modules."""
    directory = Path(directory)
    qcfg = qcfg if qcfg is not None else read_quant_config(directory)
    if qcfg is None:
        raise CheckpointError(f"{directory}: no ModelOpt quantization config (config.json quantization_config "
                              f"or {HF_QUANT_CONFIG})")
    readers: list[SafetensorsReader] = []
    try:
        for path in checkpoint_files(directory):
            readers.append(SafetensorsReader(path))
        _load(model, directory, dtype, device, qcfg, readers)
    finally:
        for r in readers:
            r.close()
    # the packed modules now carry the quantisation; a config saved from this model must not claim it
    # for tensors that may since have been dequantised (save_modelopt_checkpoint writes a fresh one)
    getattr(model.config, "extra", {}).pop("quantization_config", None)


def _load(model: nn.Module, directory: Path, dtype: torch.dtype, device: torch.device | str, qcfg: dict,
          readers: list[SafetensorsReader]) -> None:
    stored_meta: dict[str, tuple[SafetensorsReader, str, tuple]] = {}
    for reader in readers:
        for stored, (st_dtype, shape, _, _) in reader.entries.items():
            stored_meta[stored] = (reader, st_dtype, shape)

    spec = QuantSpec(qcfg)
    plan = plan_from_config(model, spec, lambda n: stored_meta.get(n, (None, None))[1])
    apply_plan(model, plan)

    expected = dict(model.named_parameters())
    expected.update(dict(model.named_buffers()))
    keep_dtype = set()  # packed weights and scales: their own dtype, whatever the model dtype
    for mname, module in model.named_modules():
        if isinstance(module, QUANTIZED_MODULES):
            keep_dtype.update(f"{mname}.{b}" for b, _ in module.named_buffers(recurse=False))
    has_mtp = any(n.startswith("mtp.") for n in expected)

    sources: dict[str, str] = {}
    experts: dict[str, dict[int, str]] = {}
    unexpected: list[str] = []
    for stored in stored_meta:
        name = canonical_name(stored)
        m = _PER_EXPERT.match(name)
        if m:
            stacked = f"{m.group(1)}.{m.group(3)}" + ("" if m.group(4) == "weight" else f"_{m.group(4)}")
            experts.setdefault(stacked, {})[int(m.group(2))] = stored
        elif name in expected:
            sources[name] = stored
        elif name.startswith("mtp.") and not has_mtp:
            continue
        elif name.endswith(_IGNORED_SUFFIXES):
            continue
        else:
            unexpected.append(stored)
    for stacked in list(experts):
        if stacked not in expected:
            unexpected.extend(experts.pop(stacked).values())

    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in sources \
            and "model.embeddings.weight" in sources:
        sources["lm_head.weight"] = sources["model.embeddings.weight"]
    optional = {n for n in expected if n.endswith(("e_score_correction_bias", "input_scale"))}

    def check(stored: str, want: tuple, tensor: torch.Tensor, what: str = "") -> None:
        _, st_dtype, got = stored_meta[stored]
        if not _same_shape(got, want):
            wrong_shape.append(f"{stored}: checkpoint {list(got)} vs model {list(want)}{what}")
        need = _ST_DTYPES.get(tensor.dtype)
        if need is not None and st_dtype != need:
            wrong_dtype.append(f"{stored}: stored {st_dtype}, expected {need}")
        elif need is None and st_dtype in _PACKED_ST:
            wrong_dtype.append(f"{stored}: stored {st_dtype} but the quantization config does not quantise it")
        elif need is None and st_dtype not in _FLOAT_ST:
            wrong_dtype.append(f"{stored}: stored {st_dtype}, expected a floating-point tensor")

    missing, wrong_shape, wrong_dtype = [], [], []
    for name, tensor in expected.items():
        want = tuple(tensor.shape)
        if name in sources:
            check(sources[name], want, tensor)
        elif name in experts:
            parts = experts[name]
            base, kind = name.rsplit(".", 1)
            proj, _, attr = kind.partition("_proj")
            absent = [k for k in range(want[0]) if k not in parts]
            if absent and name not in optional:
                suffix = "weight" if not attr else attr.lstrip("_")
                missing.extend(f"{base}.{k}.{proj}_proj.{suffix}" for k in absent)
            for k, stored in sorted(parts.items()):
                if k >= want[0]:
                    wrong_shape.append(f"{stored}: expert {k} of {want[0]}")
                else:
                    check(stored, want[1:], tensor, f" (expert {k} of {want[0]})")
        elif name not in optional:
            missing.append(name)

    problems = []
    if spec.problems:
        unique = list(dict.fromkeys(spec.problems))
        problems.append(f"quantization config problems ({len(unique)}): {_fmt(unique)}")
    missing = [checkpoint_name(n) for n in missing]  # named as in the checkpoint's files
    problems += tensor_problems(missing, unexpected, wrong_shape)
    if wrong_dtype:
        problems.append(f"tensors with the wrong dtype ({len(wrong_dtype)}): {_fmt(wrong_dtype)}")
    if problems:
        raise CheckpointError(f"quantized checkpoint {directory} ({qcfg['quant_algo']}) does not match its "
                              "config:\n  " + "\n  ".join(problems))

    on_cpu = torch.device(device).type == "cpu"

    def fill(stored: str, out: torch.Tensor) -> None:
        """Read a stored tensor into out: straight into its memory when dtype and device allow."""
        reader = stored_meta[stored][0]
        if on_cpu and out.dtype == _ST_TORCH[stored_meta[stored][1]]:
            reader.read_into(stored, out)
        else:
            out.copy_(reader.read(stored).reshape(out.shape))

    for name, tensor in expected.items():
        if name in keep_dtype:
            target = tensor.dtype
        elif name.endswith("e_score_correction_bias") or not tensor.dtype.is_floating_point:
            target = torch.float32
        else:
            target = dtype
        if name in sources:
            value = torch.empty(tensor.shape, dtype=target, device=device)
            fill(sources[name], value)
        elif name in experts:
            value = torch.empty(tensor.shape, dtype=target, device=device)
            if name in optional:  # experts the checkpoint gives no value get the default
                value.fill_(1.0 if name.endswith("input_scale") else 0.0)
            for k, stored in experts[name].items():
                fill(stored, value[k])
        elif name.endswith("input_scale"):
            value = torch.ones(tensor.shape, dtype=target, device=device)
        else:
            value = torch.zeros(tensor.shape, dtype=target, device=device)
        _set(model, name, value)


__all__ = ["read_quant_config", "load_modelopt_checkpoint", "QuantSpec", "plan_from_config", "apply_plan"]
