"""Linear layers and routed experts that keep NVFP4 / FP8 weights packed in memory and compute from them.

Buffers follow NVIDIA ModelOpt's checkpoint names, so a module's state_dict is what the checkpoint
holds for it:
  NVFP4Linear: weight uint8 [out, in/2], weight_scale float8_e4m3fn [out, in/16], weight_scale_2 f32 [],
               input_scale f32 []  (+ bias, a parameter in the model dtype)
  FP8Linear:   weight float8_e4m3fn [out, in], weight_scale f32 [], input_scale f32 []
  QuantizedExperts (stacked over E experts, per projection p in up_proj / down_proj):
    NVFP4: p uint8 [E, out, in/2], p_weight_scale fp8 [E, out, in/16], p_weight_scale_2 f32 [E],
           p_input_scale f32 [E]
    FP8:   p fp8 [E, out, in], p_weight_scale f32 [E], p_input_scale f32 [E]
    none:  p a parameter [E, out, in] in the model dtype
input_scale (the activation scale, amax/(6*448) for NVFP4, amax/448 for FP8) is kept for export and for
accelerators; the CPU path computes activations in fp32 and does not use it.

`quantize_model(model, policy)` swaps a dense model's nn.Linear layers and routed experts for these, in
place, following a policy over checkpoint module names (presets "nvfp4", "fp8", "mixed").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ATTENTION, MAMBA, ModelConfig
from ..ops.fp8 import E4M3_MAX, FP8_DTYPE, dequantize_fp8, fp8_linear, quantize_fp8
from ..ops.nvfp4 import BLOCK, E2M1_MAX, dequantize_nvfp4, nvfp4_linear, quantize_nvfp4, routed_expert_mlp
from .linear import Linear
from .moe import Experts

NVFP4, FP8 = "nvfp4", "fp8"
FORMATS = (NVFP4, FP8)


def input_scale_for(fmt: str, amax: float | None) -> float:
    """The activation scale ModelOpt stores: amax/(6*448) for NVFP4, amax/448 for FP8 (1.0 unknown)."""
    if not amax or amax <= 0:
        return 1.0
    return float(amax) / (E2M1_MAX * E4M3_MAX if fmt == NVFP4 else E4M3_MAX)


def nvfp4_capable(in_features: int) -> bool:
    return in_features % BLOCK == 0


# ---- linear layers ----------------------------------------------------------------------------------------

class _QuantizedLinear(nn.Module):
    fmt = ""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def to_linear(self, dtype: torch.dtype = torch.float32) -> Linear:
        """A dense nn.Linear with the dequantised weight."""
        lin = Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize(dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.requires_grad_(False)


class NVFP4Linear(_QuantizedLinear):
    fmt = NVFP4

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        if not nvfp4_capable(in_features):
            raise ValueError(f"NVFP4Linear: in_features must be a multiple of {BLOCK}, got {in_features}")
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, in_features // BLOCK, dtype=FP8_DTYPE,
                                                         device=device))
        self.register_buffer("weight_scale_2", torch.ones((), dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nvfp4_linear(x, self.weight, self.weight_scale, self.weight_scale_2, self.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nvfp4(self.weight, self.weight_scale, self.weight_scale_2, dtype)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, input_amax: float | None = None,
                    global_scale: float | torch.Tensor | None = None, scale_search: bool = False) -> "NVFP4Linear":
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype, device=w.device)
        m.weight, m.weight_scale, m.weight_scale_2 = quantize_nvfp4(w, global_scale, scale_search=scale_search)
        if linear.bias is not None:
            m.bias.copy_(linear.bias)
        m.input_scale.fill_(input_scale_for(NVFP4, input_amax))
        return m


class FP8Linear(_QuantizedLinear):
    fmt = FP8

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, dtype)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, input_amax: float | None = None, scale_search: bool = False
                    ) -> "FP8Linear":
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=w.dtype, device=w.device)
        m.weight, m.weight_scale = quantize_fp8(w)
        if linear.bias is not None:
            m.bias.copy_(linear.bias)
        m.input_scale.fill_(input_scale_for(FP8, input_amax))
        return m


QUANTIZED_LINEAR = {NVFP4: NVFP4Linear, FP8: FP8Linear}


# ---- routed experts ---------------------------------------------------------------------------------------

PROJECTIONS = ("up_proj", "down_proj")


class QuantizedExperts(nn.Module):
    """Routed experts (same interface as hylm.model.moe.Experts) whose up / down projections are each
    NVFP4, FP8 or dense (None), stacked over experts, every expert with its own scales."""

    def __init__(self, num_experts: int, input_size: int, intermediate_size: int, up_format: str | None,
                 down_format: str | None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_experts, self.input_size, self.intermediate_size = num_experts, input_size, intermediate_size
        self.formats = {"up_proj": up_format, "down_proj": down_format}
        for proj, fmt in self.formats.items():
            out_f, in_f = self.proj_shape(proj)
            e = num_experts
            if fmt is None:
                self.register_parameter(proj, nn.Parameter(torch.zeros(e, out_f, in_f, dtype=dtype, device=device),
                                                           requires_grad=False))
                continue
            if fmt == NVFP4:
                if not nvfp4_capable(in_f):
                    raise ValueError(f"NVFP4 experts: {proj} input size must be a multiple of {BLOCK}, got {in_f}")
                self.register_buffer(proj, torch.zeros(e, out_f, in_f // 2, dtype=torch.uint8, device=device))
                self.register_buffer(f"{proj}_weight_scale",
                                     torch.zeros(e, out_f, in_f // BLOCK, dtype=FP8_DTYPE, device=device))
                self.register_buffer(f"{proj}_weight_scale_2", torch.ones(e, dtype=torch.float32, device=device))
            elif fmt == FP8:
                self.register_buffer(proj, torch.zeros(e, out_f, in_f, dtype=FP8_DTYPE, device=device))
                self.register_buffer(f"{proj}_weight_scale", torch.ones(e, dtype=torch.float32, device=device))
            else:
                raise ValueError(f"unknown expert format {fmt!r} (expected one of {FORMATS} or None)")
            self.register_buffer(f"{proj}_input_scale", torch.ones(e, dtype=torch.float32, device=device))

    def proj_shape(self, proj: str) -> tuple[int, int]:
        return ((self.intermediate_size, self.input_size) if proj == "up_proj"
                else (self.input_size, self.intermediate_size))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, input_size={self.input_size}, "
                f"intermediate_size={self.intermediate_size}, up={self.formats['up_proj']}, "
                f"down={self.formats['down_proj']}")

    def _linear(self, proj: str) -> Callable[[int, torch.Tensor], torch.Tensor]:
        fmt, w = self.formats[proj], getattr(self, proj)
        if fmt == NVFP4:
            s, s2 = getattr(self, f"{proj}_weight_scale"), getattr(self, f"{proj}_weight_scale_2")
            return lambda e, h: nvfp4_linear(h, w[e], s[e], s2[e])
        if fmt == FP8:
            s = getattr(self, f"{proj}_weight_scale")
            return lambda e, h: fp8_linear(h, w[e], s[e])
        return lambda e, h: F.linear(h, w[e].float())

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = routed_expert_mlp(x, weights, ids, self.num_experts, self._linear("up_proj"),
                                self._linear("down_proj"), self.input_size)
        return out.to(x.dtype)

    def dequantize(self, proj: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The projection's weights as a dense [E, out, in] tensor."""
        fmt, w = self.formats[proj], getattr(self, proj)
        if fmt is None:
            return w.to(dtype)
        out = torch.empty(self.num_experts, *self.proj_shape(proj), dtype=dtype, device=w.device)
        for e in range(self.num_experts):
            if fmt == NVFP4:
                out[e] = dequantize_nvfp4(w[e], getattr(self, f"{proj}_weight_scale")[e],
                                          getattr(self, f"{proj}_weight_scale_2")[e], dtype)
            else:
                out[e] = dequantize_fp8(w[e], getattr(self, f"{proj}_weight_scale")[e], dtype)
        return out

    def to_experts(self, dtype: torch.dtype = torch.float32) -> Experts:
        """Dense hylm Experts with the dequantised weights."""
        dense = Experts(self.num_experts, self.input_size, self.intermediate_size).to(dtype)
        with torch.no_grad():
            dense.up_proj.copy_(self.dequantize("up_proj", dtype))
            dense.down_proj.copy_(self.dequantize("down_proj", dtype))
        return dense.requires_grad_(False)

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: Experts, up_format: str | None, down_format: str | None,
                     input_amax: dict[str, list[float | None]] | None = None, scale_search: bool = False
                     ) -> "QuantizedExperts":
        """Quantise dense Experts; input_amax: projection -> per-expert activation amax (None unknown);
        scale_search: NVFP4 block scales by least squares (see hylm.ops.nvfp4)."""
        e, i, d = experts.up_proj.shape
        p = experts.up_proj
        m = cls(e, d, i, up_format, down_format, dtype=p.dtype, device=p.device)
        for proj, fmt in m.formats.items():
            dense = getattr(experts, proj)
            if fmt is None:
                getattr(m, proj).copy_(dense)
                continue
            amax = (input_amax or {}).get(proj) or [None] * e
            for k in range(e):
                if fmt == NVFP4:
                    q, s, s2 = quantize_nvfp4(dense[k], scale_search=scale_search)
                    getattr(m, f"{proj}_weight_scale_2")[k] = s2
                else:
                    q, s = quantize_fp8(dense[k])
                getattr(m, proj)[k] = q
                getattr(m, f"{proj}_weight_scale")[k] = s
                getattr(m, f"{proj}_input_scale")[k] = input_scale_for(fmt, amax[k])
        return m


class NVFP4Experts(QuantizedExperts):
    def __init__(self, num_experts: int, input_size: int, intermediate_size: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__(num_experts, input_size, intermediate_size, NVFP4, NVFP4, dtype, device)


class FP8Experts(QuantizedExperts):
    def __init__(self, num_experts: int, input_size: int, intermediate_size: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__(num_experts, input_size, intermediate_size, FP8, FP8, dtype, device)


QUANTIZED_MODULES = (_QuantizedLinear, QuantizedExperts)


# ---- names ------------------------------------------------------------------------------------------------

def checkpoint_name(name: str) -> str:
    """hylm module name -> NVIDIA checkpoint module name (`model.` -> `backbone.`)."""
    return "backbone." + name[len("model."):] if name.startswith("model.") else name


def expert_module_name(experts_name: str, expert: int, proj: str) -> str:
    """hylm name of a stacked Experts module -> the checkpoint name of one expert's projection."""
    return f"{checkpoint_name(experts_name)}.{expert}.{proj}"


# ---- policies ---------------------------------------------------------------------------------------------

@dataclass
class QuantPolicy:
    """Which checkpoint modules get which format: rules are (fnmatch pattern over checkpoint module names
    such as `backbone.layers.3.mixer.in_proj` or `backbone.layers.1.mixer.experts.0.up_proj`, format
    "nvfp4" | "fp8" | None); the first matching rule wins, `default` applies otherwise.

    Layers NVFP4 cannot hold (an input size that is not a multiple of 16) stay unquantised."""
    rules: list[tuple[str, str | None]] = field(default_factory=list)
    default: str | None = None
    name: str = "custom"

    def format_for(self, module_name: str) -> str | None:
        for pattern, fmt in self.rules:
            if fnmatchcase(module_name, pattern):
                return fmt
        return self.default


# Never quantised by the presets: MTP (stored bf16 in NVIDIA's releases) and the output head. Embeddings,
# norms, conv1d and the router are not Linear layers and are never quantised.
_ALWAYS_BF16 = [("mtp.*", None), ("lm_head", None)]
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
POLICY_PRESETS = ("nvfp4", "fp8", "mixed")


def preset_policy(name: str, config: ModelConfig) -> QuantPolicy:
    """"nvfp4": as Nemotron 3 Nano's NVFP4 release, every Linear and routed expert NVFP4 except lm_head,
    the attention layers and the Mamba layer before each attention layer (and conv1d, norms, router,
    embeddings, MTP, which no preset quantises).
    "fp8": every Linear and routed expert FP8 per-tensor except lm_head (and MTP).
    "mixed": as Nemotron 3 Super's NVFP4 release (MIXED_PRECISION): routed experts NVFP4; Mamba
    in_proj / out_proj, shared experts, latent projections and dense MLPs FP8; attention q/k/v/o, router,
    conv1d, norms, embeddings, lm_head and MTP unquantised."""
    if name == "nvfp4":
        rules = list(_ALWAYS_BF16)
        for i, kind in enumerate(config.pattern):
            if kind != ATTENTION:
                continue
            rules.append((f"backbone.layers.{i}.mixer.*", None))
            before = [j for j in range(i) if config.pattern[j] == MAMBA]
            if before:
                rules.append((f"backbone.layers.{before[-1]}.mixer.*", None))
        return QuantPolicy(rules, default=NVFP4, name=name)
    if name == "fp8":
        return QuantPolicy(list(_ALWAYS_BF16), default=FP8, name=name)
    if name == "mixed":
        rules = list(_ALWAYS_BF16) + [
            ("*.mixer.experts.*", NVFP4),
            ("*.mixer.in_proj", FP8), ("*.mixer.out_proj", FP8),
            ("*.mixer.shared_experts.*", FP8),
            ("*.mixer.fc1_latent_proj", FP8), ("*.mixer.fc2_latent_proj", FP8),
            ("*.mixer.up_proj", FP8), ("*.mixer.down_proj", FP8),
        ]
        return QuantPolicy(rules, default=None, name=name)
    raise ValueError(f"unknown quantization preset {name!r} (known: {', '.join(POLICY_PRESETS)})")


# ---- calibration ------------------------------------------------------------------------------------------

@torch.no_grad()
def calibrate_input_amax(model: nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """Run input_ids [B, T] through a dense model and record every Linear's input amax, keyed by hylm
    module name, and every routed expert's (`<experts>.<e>.up_proj` / `.down_proj`)."""
    amax: dict[str, float] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        if value.numel():
            amax[name] = max(amax.get(name, 0.0), float(value.detach().abs().max()))

    def linear_hook(name):
        return lambda module, inputs, output: keep(name, inputs[0])

    def experts_hook(name):
        def hook(module, inputs, output):
            x, _, ids = inputs
            for e in ids.unique().tolist():
                xe = x[(ids == e).any(-1)]
                keep(f"{name}.{e}.up_proj", xe)
                keep(f"{name}.{e}.down_proj", torch.relu(xe @ module.up_proj[e].t()).square())
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook(name)))
        elif isinstance(module, Experts):
            handles.append(module.register_forward_hook(experts_hook(name)))
    try:
        model(input_ids)
    finally:
        for h in handles:
            h.remove()
    return amax


# ---- whole-model quantisation -----------------------------------------------------------------------------

def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantizable_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """(hylm name, module) of every dense nn.Linear and routed Experts module."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Experts))]


def resolve_policy(policy: str | QuantPolicy, config: ModelConfig) -> QuantPolicy:
    return preset_policy(policy, config) if isinstance(policy, str) else policy


def plan_model(model: nn.Module, policy: str | QuantPolicy) -> dict[str, str | tuple[str | None, str | None]]:
    """hylm module name -> format for each Linear the policy quantises, (up, down) formats for Experts."""
    policy = resolve_policy(policy, model.config)
    plan: dict[str, str | tuple[str | None, str | None]] = {}
    for name, module in quantizable_modules(model):
        if isinstance(module, nn.Linear):
            fmt = policy.format_for(checkpoint_name(name))
            if fmt == NVFP4 and not nvfp4_capable(module.in_features):
                fmt = None
            if fmt is not None:
                plan[name] = fmt
            continue
        fmts = []
        e, i, d = module.up_proj.shape
        for proj, in_f in (("up_proj", d), ("down_proj", i)):
            chosen = {policy.format_for(expert_module_name(name, k, proj)) for k in range(e)}
            if len(chosen) > 1:
                raise ValueError(f"policy {policy.name!r} gives the experts of {checkpoint_name(name)}.*.{proj} "
                                 f"different formats {sorted(map(str, chosen))}; hylm stores one format per "
                                 "projection and layer")
            fmt = chosen.pop()
            fmts.append(None if fmt == NVFP4 and not nvfp4_capable(in_f) else fmt)
        if any(f is not None for f in fmts):
            plan[name] = (fmts[0], fmts[1])
    return plan


@torch.no_grad()
def quantize_model(model: nn.Module, policy: str | QuantPolicy = "nvfp4",
                   input_amax: dict[str, float] | None = None,
                   progress: Callable[[Iterable], Iterable] | None = None, nvfp4_scale_search: bool = False
                   ) -> nn.Module:
    """Replace, in place, the dense Linear layers and routed experts the policy selects by packed NVFP4 /
    FP8 modules (already-quantised modules are left alone). input_amax: activation amax per module (from
    calibrate_input_amax) for the exported input_scale; 1.0 where unknown. nvfp4_scale_search: NVFP4 block
    scales chosen by least squares instead of ModelOpt's amax rule (same format). Returns the model."""
    input_amax = input_amax or {}
    plan = plan_model(model, policy)
    items = list(plan.items())
    for name, fmt in (progress(items) if progress else items):
        module = model.get_submodule(name)
        if isinstance(fmt, str):
            new = QUANTIZED_LINEAR[fmt].from_linear(module, input_amax.get(name), scale_search=nvfp4_scale_search)
        else:
            e = module.up_proj.shape[0]
            amax = {proj: [input_amax.get(f"{name}.{k}.{proj}") for k in range(e)] for proj in PROJECTIONS}
            for proj in PROJECTIONS:  # experts no calibration token reached: the layer's largest
                known = [a for a in amax[proj] if a]
                amax[proj] = [a or (max(known) if known else None) for a in amax[proj]]
            new = QuantizedExperts.from_experts(module, fmt[0], fmt[1], amax, scale_search=nvfp4_scale_search)
        _replace(model, name, new.requires_grad_(False))
        del module
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every packed module by its dense dequantised equivalent, in place. Returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, _QuantizedLinear):
            _replace(model, name, module.to_linear(dtype))
        elif isinstance(module, QuantizedExperts):
            _replace(model, name, module.to_experts(dtype))
    return model


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZED_MODULES)}
