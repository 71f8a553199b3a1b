"""Few-token fast paths: a whole pre-norm block (x + mixer(norm(x))) in one native call (hylm.ops: the MoE and
attention blocks), prepared once per layer. Decode steps, speculative verification and MTP drafts run blocks on
a handful of rows, where the PyTorch composition is dozens of dispatches for microseconds of arithmetic.

Only inference takes them (no autograd), fp32 on the CPU, at most MAX_ROWS tokens; everything else runs the
layers' PyTorch code, which is also their reference (tests compare both)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.nn.modules import module as _module

enabled = True  # benchmarks and tests flip this to compare with the PyTorch paths in one process
MAX_ROWS = 64  # measured: 32-row decode batches and 8 x 6-token verifications gain over the MKL/oneDNN paths too


def applicable(x: torch.Tensor) -> bool:
    return (enabled and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.dtype == torch.float32
            and x.device.type == "cpu" and not torch.is_grad_enabled())


_structure_epoch = 0


def _structure_changed(*_args: Any) -> None:
    global _structure_epoch
    _structure_epoch += 1


# Any parameter, buffer or submodule assigned anywhere (a module swapped for a quantized one, a new Parameter)
# moves this epoch on: a layer's list of the tensors its plan reads is collected again only then. Collecting it
# walks a dozen nn.Module attributes (~20 us for a MoE layer on this CPU, per layer and step); the tensors' own
# storage and in-place updates are still checked on every call.
_module.register_module_parameter_registration_hook(_structure_changed)
_module.register_module_buffer_registration_hook(_structure_changed)
_module.register_module_module_registration_hook(_structure_changed)


class PlanCache:
    """A prepared native plan and the storage of the tensors it was built from: rebuilt when any of them is
    replaced (a new Parameter, `.data` reassigned, a module swapped for a quantized one) or changed in place.
    The plan keeps the old storage alive, so a new tensor can never reuse its address unnoticed."""

    __slots__ = ("key", "plan", "epoch", "collected")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.plan: Any = None
        self.epoch = -1
        self.collected: tuple | None = None

    def sources(self, collect: Callable[[], tuple | None]) -> tuple | None:
        """collect() (the tensors a plan reads, None where the layer can't take it), called again only after a
        parameter, buffer or module has been assigned somewhere since the last call."""
        if self.epoch != _structure_epoch:
            self.collected, self.epoch = collect(), _structure_epoch
        return self.collected

    def __deepcopy__(self, memo: dict) -> "PlanCache":
        return PlanCache()  # derived data pointing at the original's tensors: a copy prepares its own

    def __reduce__(self):
        return (PlanCache, ())

    def get(self, sources: tuple[torch.Tensor | None, ...] | None, build: Callable[[], Any]) -> Any:
        if sources is None:
            return None
        # _version: an in-place update (a training step) invalidates constants a plan derived, e.g. -exp(A_log)
        # (inference tensors, e.g. weights created under torch.inference_mode, keep no version counter)
        key = tuple(None if t is None else (t.data_ptr(), t.dtype, t.shape, t.stride(),
                                            -1 if t.is_inference() else t._version) for t in sources)
        if key != self.key:
            self.plan, self.key = build(), key
        return self.plan
