"""Few-token fast paths: a whole pre-norm block (x + mixer(norm(x))) in one native call (hylm.ops: the Mamba, MoE and
attention blocks), prepared once per layer, and a stack of such blocks bound first and run kernel after kernel
(`NativeStack`). Decode steps, speculative verification and MTP drafts run blocks on a handful of rows, where the
PyTorch composition is dozens of dispatches for microseconds of arithmetic.

Only inference takes them (no autograd), fp32 on the CPU, at most MAX_ROWS tokens; everything else runs the
layers' PyTorch code, which is also their reference (tests compare both)."""

from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

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


class NativeStep:
    """What the blocks of one few-row forward share: the batch's shape, its slots as a tensor, attention scratch.
    Blocks bind their kernels' arguments through it (`native_block_args`) before any of them runs; the arguments
    are addresses, so the step must outlive the calls (it owns the tensors it made for them)."""

    __slots__ = ("batch", "state", "tokens", "keep", "uniform", "_slots", "_work")

    def __init__(self, batch: Any, state: Any):
        self.batch, self.state = batch, state
        t = batch.seq_lens[0]
        keep = bool(batch.keep_states and batch.keep_states[0])
        self.tokens, self.keep = t, keep
        # every sequence t new tokens, and the states after every token kept for all of them or for none
        self.uniform = all(n == t for n in batch.seq_lens) and (
            not batch.keep_states or all(bool(k) == keep for k in batch.keep_states))
        self._slots: torch.Tensor | None = None
        self._work: dict = {}

    def slots(self) -> torch.Tensor:
        if self._slots is None:
            self._slots = torch.tensor(self.batch.slots, dtype=torch.int64)  # [B]
        return self._slots

    def scratch(self, key: Any, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One scratch tensor per key for the whole forward: its blocks run one after another."""
        t = self._work.get(key)
        if t is None:
            t = self._work[key] = make()
        return t


def block_plan(block: torch.nn.Module) -> Any:
    """The prepared native kernel of a pre-norm block (its mixer's `native_block_plan`), or None."""
    if getattr(block, "reduce_output", None) is not None:  # a tensor-parallel part: its output is partial
        return None
    plan_of = getattr(block.mixer, "native_block_plan", None)
    return plan_of(block.norm) if plan_of is not None else None


def run_block(block: torch.nn.Module, plan: Any, x: torch.Tensor, batch: Any, state: Any) -> torch.Tensor | None:
    """block(x) in one native call, or None (nothing run) where it has no plan or can't take this batch."""
    if plan is None or not applicable(x):
        return None
    x = x.contiguous()  # [R, D]
    out = torch.empty_like(x)  # [R, D]
    step = NativeStep(batch, state)  # holds what the arguments point to (slots, scratch) until the call is done
    args = block.mixer.native_block_args(plan, x, out, step)
    if args is None:
        return None
    plan.run(args)
    return out


class NativeStack:
    """A sequence of blocks (the model's layers, the MTP's) run kernel after kernel, their plans kept between calls
    while no parameter or buffer of theirs is replaced or updated in place. Checking that costs one pass over their
    tensors' addresses and versions per forward, instead of a plan lookup per block (~5-20 us each)."""

    __slots__ = ("plans", "key", "epoch", "tensors", "versioned")

    def __init__(self) -> None:
        self.plans: list | None = None
        self.key: tuple | None = None
        self.epoch = -1
        self.tensors: list = []
        self.versioned: list = []

    def __deepcopy__(self, memo: dict) -> "NativeStack":
        return NativeStack()

    def __reduce__(self):
        return (NativeStack, ())

    def plans_for(self, blocks: Sequence[torch.nn.Module]) -> list:
        """Each block's plan (None where it has none), prepared again only when one of their tensors changed."""
        if self.epoch != _structure_epoch:
            self.tensors = [t for b in blocks for t in (*b.parameters(), *b.buffers())]
            self.versioned = [t for t in self.tensors if not t.is_inference()]  # inference tensors keep no version
            self.epoch, self.key = _structure_epoch, None
        key = (tuple(map(torch.Tensor.data_ptr, self.tensors)), tuple(map(_version, self.versioned)))
        if key != self.key:
            self.plans, self.key = [block_plan(b) for b in blocks], key
        return self.plans

    def __call__(self, blocks: Sequence[torch.nn.Module], x: torch.Tensor, batch: Any, state: Any,
                 plans: Sequence | None = None) -> torch.Tensor:
        """x through every block -> the last one's output. For a few fp32 rows at inference, runs of blocks with
        native kernels are bound first, then run back to back over two ping-pong buffers; a block without one (an
        MLP, a quantized layer, a batch its kernel can't take) runs its forward, as every block does otherwise.
        plans: the blocks' (`plans_for` of a list these blocks are part of), else this stack's for them."""
        if not applicable(x):
            for block in blocks:
                x = block(x, batch, state)
            return x
        step = NativeStep(batch, state)
        x = x.contiguous()  # [R, D]
        bufs = (torch.empty_like(x), torch.empty_like(x))
        calls: list = []
        for block, plan in zip(blocks, self.plans_for(blocks) if plans is None else plans):
            dst = bufs[len(calls) % 2]  # never the pending call's input: that is the other buffer or a fresh tensor
            args = block.mixer.native_block_args(plan, x, dst, step) if plan is not None else None
            if args is not None:
                calls.append((plan.run, args, x))  # args hold x's address only: the call keeps it alive
                x = dst
                continue
            for run, pending, _ in calls:
                run(pending)
            calls.clear()
            x = block(x, batch, state)  # a fresh tensor
        for run, pending, _ in calls:
            run(pending)
        return x


_version = operator.attrgetter("_version")
