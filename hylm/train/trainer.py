"""Training loop for `nemotron_h` models on the synthetic curriculum (CPU or GPU).

One step:
1. Pack rendered examples (`curriculum.render_for_training`: token ids + loss mask) into one packed batch of
   about `batch_tokens` tokens. Every example is its own sequence of one `Batch` (context 0, slots 0..n-1,
   state None), so Mamba states, convolutions and attention all restart at each example.
2. `model.hidden_states(ids, batch)` -> hidden [N, D]; logits only on the rows whose NEXT token is a target
   (mask 1) and lies in the same sequence; cross-entropy against that token.
3. MTP (when the config has it): the MTP block runs on every sequence shortened by one, with inputs
   (embedding of token t+1, hidden state of token t) -> draft hidden; logits predict token t+2 where that
   token is a target of the same sequence. With `mtp_depth` D > 1 the same block is applied again, as
   speculative decoding applies it for draft d: level d reads level d-1's output at position t-1 and the
   embedding of token t+1 and predicts token t+2 (d tokens past the last real hidden state), on every
   sequence shortened by d. mtp = mean over levels; loss = main + mtp_weight * mtp. Gradients reach the
   trunk through the hidden states too (as in DeepSeek-V3 / Nemotron 3 joint MTP training).
4. AdamW (weight decay on matrices except the embeddings), linear warmup then cosine decay to min_lr,
   gradient clipping by global norm.
5. Aux-loss-free MoE balancing (DeepSeek-V3): after each step every router's `e_score_correction_bias` moves
   by `router_bias_rate * sign(mean load - load)` (the bias steers the top-k choice only, not the weights).

Data: example k of the run has seed `(data_seed + k) % 10**6` (the training seed range; evaluation uses
seeds >= 10**9). The position in that stream (`cursor`) is part of the checkpoint, so a resumed run sees
exactly the batches the uninterrupted run would have seen.

Output directory:
  config.json, model.safetensors, tokenizer files   -- the final model (what `hylm eval-tasks` reads)
  checkpoints/step_NNNNNNN/                         -- config.json, model.safetensors (fp32, NVIDIA names),
      tokenizer files, optimizer.safetensors (per parameter NAME.exp_avg / NAME.exp_avg_sq / NAME.step),
      trainer_state.json (step, data cursor, seeds, loss history, train config). No pickles anywhere.
  train_log.jsonl, loss_curve.png (when matplotlib is installed)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model import Batch, NemotronHModel
from ..model.init import init_weights
from ..model.moe import Router
from . import curriculum
from .configs import resolve_model_config
from .config import TrainConfig

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINTS = "checkpoints"
STATE_FORMAT = 1


# ---------------------------------------------------------------------------------------------- packing
@dataclass
class MtpLevel:
    """One application of the MTP block during training (level d = draft d of speculative decoding)."""
    batch: Batch  # every sequence shortened by d
    src: torch.Tensor  # [rows] rows of the previous level (the trunk for d = 1) giving each row's hidden input
    embed: torch.Tensor  # [rows] indices into PackedBatch.ids of the token each row embeds
    rows: torch.Tensor  # [K] rows whose target is a target of the same sequence
    targets: torch.Tensor  # [K]

    def to(self, device: torch.device | str) -> "MtpLevel":
        return dataclasses.replace(self, src=self.src.to(device), embed=self.embed.to(device),
                                   rows=self.rows.to(device), targets=self.targets.to(device))


@dataclass
class PackedBatch:
    ids: torch.Tensor  # [N] all tokens, sequences back to back
    batch: Batch
    rows: torch.Tensor  # [M] rows whose next token is a target
    targets: torch.Tensor  # [M]
    mtp_levels: list[MtpLevel]  # empty without MTP
    num_examples: int = 0
    real_tokens: int = 0  # tokens without padding
    pad_mask: torch.Tensor | None = None  # [N] True on padding rows (None: no padding)

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())

    def to(self, device: torch.device | str) -> "PackedBatch":
        move = (lambda t: None if t is None else t.to(device))
        return dataclasses.replace(self, ids=move(self.ids), rows=move(self.rows), targets=move(self.targets),
                                   mtp_levels=[lv.to(device) for lv in self.mtp_levels],
                                   pad_mask=move(self.pad_mask))


def _mtp_level(depth: int, spans: list[tuple[int, int, int]], prev_offsets: list[int],
               seqs: list[tuple[list[int], list[int]]]) -> MtpLevel:
    """Level `depth` rows: for sequence s (start lo, real length n, padded length L) rows j = 0..L-depth-1
    read previous-level row j, embed token lo+j+depth and predict token j+depth+1 of the sequence."""
    src: list[int] = []
    embed: list[int] = []
    rows: list[int] = []
    targets: list[int] = []
    for (lo, n, length), prev_lo, (ids, mask) in zip(spans, prev_offsets, seqs):
        row_lo = len(src)
        for j in range(length - depth):
            src.append(prev_lo + j)
            embed.append(lo + j + depth)
            t = j + depth + 1
            if t < n and mask[t]:
                rows.append(row_lo + j)
                targets.append(ids[t])
    lt = (lambda x: torch.tensor(x, dtype=torch.long))
    batch = Batch([length - depth for _, _, length in spans], [0] * len(spans), list(range(len(spans))))
    return MtpLevel(batch, lt(src), lt(embed), lt(rows), lt(targets))


def pack_sequences(seqs: list[tuple[list[int], list[int]]], pad_multiple: int = 1, pad_id: int = 0,
                   with_mtp: bool = True, mtp_depth: int = 1) -> PackedBatch:
    """(ids, loss mask) per example -> one packed batch (see the module doc for the targets)."""
    all_ids: list[int] = []
    lens: list[int] = []
    rows: list[int] = []
    targets: list[int] = []
    spans: list[tuple[int, int, int]] = []  # (start, real length, padded length) per sequence
    for ids, mask in seqs:
        if len(ids) != len(mask):
            raise ValueError("ids and loss mask differ in length")
    seqs = [(ids, mask) for ids, mask in seqs if len(ids) >= 2]
    for ids, mask in seqs:
        n = len(ids)
        pad = (-n) % pad_multiple if pad_multiple > 1 else 0
        lo = len(all_ids)
        for p in range(n - 1):
            if mask[p + 1]:
                rows.append(lo + p)
                targets.append(ids[p + 1])
        all_ids.extend(ids)
        all_ids.extend([pad_id] * pad)
        lens.append(n + pad)
        spans.append((lo, n, n + pad))
    if not lens:
        raise ValueError("no sequence with at least two tokens to train on")
    k = len(lens)
    batch = Batch(lens, [0] * k, list(range(k)))
    lt = (lambda x: torch.tensor(x, dtype=torch.long))
    levels: list[MtpLevel] = []
    if with_mtp:
        for depth in range(1, max(1, mtp_depth) + 1):
            if min(length for _, _, length in spans) <= depth:
                break  # a sequence would have no row left at this depth
            prev_offsets = batch.offsets if depth == 1 else levels[-1].batch.offsets
            levels.append(_mtp_level(depth, spans, prev_offsets, seqs))
    real = sum(n for _, n, _ in spans)
    pad_mask = None
    if real != len(all_ids):
        pad_mask = torch.ones(len(all_ids), dtype=torch.bool)
        for lo, n, _ in spans:
            pad_mask[lo: lo + n] = False
    return PackedBatch(lt(all_ids), batch, lt(rows), lt(targets), levels, num_examples=k, real_tokens=real,
                       pad_mask=pad_mask)


class ExampleStream:
    """Rendered, truncated training examples by index (example k has seed (data_seed + k) % 10**6, or a
    held-out seed), with a small cache so an example that did not fit a batch is not rendered twice."""

    def __init__(self, template: Any, tokenizer: Any, seq_len: int, data_seed: int = 0,
                 mix: dict[str, float] | None = None, task_opts: dict | None = None, held_out: bool = False):
        self.template, self.tokenizer, self.seq_len = template, tokenizer, seq_len
        self.data_seed, self.mix, self.task_opts = data_seed, curriculum.check_mix(mix), task_opts
        self.held_out = held_out
        self._cache: dict[int, tuple[list[int], list[int]] | None] = {}

    def get(self, index: int) -> tuple[list[int], list[int]] | None:
        """(ids, mask) of example `index`, truncated to seq_len; None when nothing is left to learn."""
        if index not in self._cache:
            seed = curriculum.example_seed(self.data_seed, index, self.held_out)
            ex = curriculum.example_for_seed(seed, self.mix, self.task_opts)
            ids, mask = curriculum.render_for_training(ex, self.template, self.tokenizer)
            ids, mask = ids[: self.seq_len], mask[: self.seq_len]
            item = (ids, mask) if len(ids) >= 2 and any(mask[1:]) else None
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[index] = item
        return self._cache[index]

    def next_batch(self, cursor: int, batch_tokens: int, pad_multiple: int = 1, pad_id: int = 0,
                   with_mtp: bool = True, mtp_depth: int = 1) -> tuple[PackedBatch, int]:
        """Examples from `cursor` on while they fit in batch_tokens (at least one). Returns the batch and
        the cursor of the first example not used."""
        seqs: list[tuple[list[int], list[int]]] = []
        total = 0
        while True:
            item = self.get(cursor)
            if item is None:
                cursor += 1
                continue
            n = len(item[0]) + ((-len(item[0])) % pad_multiple if pad_multiple > 1 else 0)
            if seqs and total + n > batch_tokens:
                break
            seqs.append(item)
            total += n
            cursor += 1
        return pack_sequences(seqs, pad_multiple, pad_id, with_mtp, mtp_depth), cursor


# ---------------------------------------------------------------------------------------------- loss
def compute_losses(model: NemotronHModel, pb: PackedBatch, mtp_weight: float = 0.3, trunk_grad: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(total loss, main next-token loss, MTP loss or None): token means over the targets; the MTP loss is
    the mean over its levels. Without trunk_grad the main model runs without autograd (an MTP-only run)."""
    with torch.set_grad_enabled(trunk_grad and torch.is_grad_enabled()):
        hidden = model.hidden_states(pb.ids, pb.batch)  # [N, D]
        logits = model.logits(hidden[pb.rows])  # [M, V] fp32
        main = F.cross_entropy(logits, pb.targets)
    if model.mtp is None or not pb.mtp_levels or mtp_weight == 0:
        return main, main, None
    losses = []
    prev = hidden
    for level in pb.mtp_levels:
        draft = model.mtp(model.model.embeddings(pb.ids[level.embed]), prev[level.src], level.batch, None)  # [rows, D]
        if level.rows.numel():
            losses.append(F.cross_entropy(model.logits(draft[level.rows]), level.targets))  # [K, V] logits
        prev = draft
    if not losses:
        return main, main, None
    mtp = torch.stack(losses).mean()
    return main + mtp_weight * mtp, main, mtp


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr at the end."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_model(config: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> NemotronHModel:
    """A freshly initialised, trainable model (fp32, train mode)."""
    model = NemotronHModel(config)
    init_weights(model, config, seed=seed)
    model = model.to(device)
    model.requires_grad_(True)
    return model.train()


def load_trainable(directory: str | os.PathLike, device: str | torch.device = "cpu") -> NemotronHModel:
    """A checkpoint's weights in a trainable fp32 model (row-major, requires_grad, train mode)."""
    from ..weights import load_hf_checkpoint

    config = ModelConfig.from_json(Path(directory) / "config.json")
    with torch.device("meta"):
        model = NemotronHModel(config)
    load_hf_checkpoint(model, directory, dtype=torch.float32, device=device)
    model.requires_grad_(True)
    return model.train()


def make_optimizer(model: NemotronHModel, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embeddings" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


# ---------------------------------------------------------------------------------------------- optimizer io
def save_optimizer(model: NemotronHModel, opt: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, p in model.named_parameters():
        st = opt.state.get(p)
        if not st:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"{name}.{key}"] = st[key].detach().to("cpu").contiguous()
        step = st["step"]
        tensors[f"{name}.step"] = (step.detach().to("cpu").float().reshape(()) if torch.is_tensor(step)
                                   else torch.tensor(float(step)))
    save_file(tensors, str(path), metadata={"format": "hylm-adamw-1"})


def load_optimizer(model: NemotronHModel, opt: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for name, p in model.named_parameters():
        if f"{name}.exp_avg" not in tensors:
            continue
        opt.state[p] = {
            "step": tensors[f"{name}.step"].clone().float(),
            "exp_avg": tensors[f"{name}.exp_avg"].to(device=p.device, dtype=p.dtype),
            "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].to(device=p.device, dtype=p.dtype),
        }


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_FILE).is_file()
                  and not p.name.endswith(".tmp"))
    return done[-1] if done else None


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """`Trainer(cfg).run()`; or step by step: `pb = trainer.next_batch(); trainer.train_step(pb)`."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.out = Path(cfg.out_dir)
        self.device = torch.device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.dtype not in ("fp32", "float32", "bf16", "bfloat16"):
            raise ValueError(f"dtype: expected fp32 or bf16, got {cfg.dtype!r}")
        if cfg.mtp_depth < 1:
            raise ValueError(f"mtp_depth: expected 1 or more, got {cfg.mtp_depth}")
        self.step = 0
        self.cursor = 0
        self.history: dict[str, list] = {"step": [], "loss": [], "main_loss": [], "mtp_loss": [], "lr": [],
                                         "grad_norm": [], "tokens": [], "eval": []}
        self.tokens_seen = 0
        self.train_seconds = 0.0  # wall time spent in steps, summed over resumed runs (for the model card)
        self.out.mkdir(parents=True, exist_ok=True)

        resume_dir = latest_checkpoint(self.out) if cfg.resume else None
        if cfg.resume and resume_dir is None:
            self.log(f"hylm train: no checkpoint in {self.out / CHECKPOINTS}, starting from scratch")
        self.tokenizer_dir = self._tokenizer_dir(resume_dir)
        from ..chat import ChatTemplate, Tokenizer

        self.tokenizer = Tokenizer.from_dir(self.tokenizer_dir)
        self.template = ChatTemplate.from_dir(self.tokenizer_dir)

        if resume_dir is not None:
            self.model = load_trainable(resume_dir, self.device)
        elif cfg.init_from:
            self.model = load_trainable(cfg.init_from, self.device)
        else:
            self.model = build_model(self._model_config(), cfg.seed, self.device)
        self.config = self.model.config
        if cfg.mtp_only:
            if self.model.mtp is None:
                raise ValueError("mtp_only: the model has no MTP block (num_nextn_predict_layers is 0)")
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("mtp."))
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{self.config.vocab_size}")
        self.optimizer = make_optimizer(self.model, cfg)
        # the routers whose correction biases balance their load (an MTP-only run leaves the others alone)
        self.routers = [m for m in (self.model.mtp if cfg.mtp_only else self.model).modules() if isinstance(m, Router)]
        self._loads: dict[Router, torch.Tensor] = {}
        self._counting = False
        self._keep_rows: dict[int, torch.Tensor] = {}  # row count -> rows that are not padding
        self.last_imbalance: float | None = None
        self._hooks = [r.register_forward_hook(self._count_load) for r in self.routers]
        self.stream = ExampleStream(self.template, self.tokenizer, cfg.seq_len, cfg.data_seed, cfg.mix,
                                    cfg.task_opts)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._eval_batch: PackedBatch | None = None
        if resume_dir is not None:
            self._load_state(resume_dir)
            self.log(f"hylm train: resumed from {resume_dir} at step {self.step}")

    # ---- setup helpers
    def _model_config(self) -> ModelConfig:
        return resolve_model_config(self.cfg.model)

    def _tokenizer_dir(self, resume_dir: Path | None) -> Path:
        from .tokenizer import copy_tokenizer_files

        cfg = self.cfg
        for cand in (cfg.tokenizer, resume_dir, cfg.init_from, self.out):
            if cand is not None and (Path(cand) / "tokenizer.json").is_file():
                # the run directory keeps its own copy: a resumed-from checkpoint is rotated away later
                copy_tokenizer_files(cand, self.out)
                return self.out
        if cfg.tokenizer is not None:
            raise FileNotFoundError(f"{cfg.tokenizer}: no tokenizer.json")
        from .tokenizer import train_curriculum_tokenizer

        vocab = resolve_model_config(cfg.model).vocab_size
        self.log(f"hylm train: training a {vocab}-token BPE tokenizer on {cfg.tokenizer_corpus} examples")
        return train_curriculum_tokenizer(self.out, vocab, cfg.tokenizer_corpus, cfg.data_seed, cfg.mix,
                                          cfg.task_opts)

    # ---- router balancing
    def _count_load(self, module: Router, inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        if not self._counting:
            return
        ids = output[1].detach()  # [rows, k]
        keep = self._keep_rows.get(ids.shape[0])
        if keep is not None:  # padding does not count as load
            ids = ids[keep]
        ids = ids.reshape(-1)
        counts = torch.bincount(ids, minlength=module.weight.shape[0])
        prev = self._loads.get(module)
        self._loads[module] = counts if prev is None else prev + counts

    @torch.no_grad()
    def _update_router_bias(self) -> None:
        loads = [load.float() for load in self._loads.values()]
        # max expert load / mean load, averaged over the MoE layers (1.0 = perfectly balanced)
        self.last_imbalance = (sum(float(x.max() / x.mean().clamp(min=1e-9)) for x in loads) / len(loads)
                               if loads else None)
        rate = self.cfg.router_bias_rate
        if rate:
            for r, load in self._loads.items():
                load = load.float()
                r.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        self._loads = {}

    # ---- one step
    def next_batch(self) -> PackedBatch:
        pb, self.cursor = self.stream.next_batch(self.cursor, self.cfg.batch_tokens, self.cfg.pad_multiple,
                                                 self.pad_id, with_mtp=self.model.mtp is not None,
                                                 mtp_depth=self.cfg.mtp_depth)
        return pb

    def _autocast(self):
        if self.cfg.dtype in ("bf16", "bfloat16"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self, pb: PackedBatch) -> dict[str, float]:
        """Forward, backward, clip, AdamW step, router-bias update on one packed batch; advances `step`."""
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        pb = pb.to(self.device)
        self.model.train()
        self._keep_rows = {}
        if pb.pad_mask is not None:  # the main layers see all N rows, the MTP block N - n of them
            keep = ~pb.pad_mask
            self._keep_rows[keep.numel()] = keep
            for level in pb.mtp_levels:  # a row is real where the token it embeds is
                self._keep_rows[level.src.numel()] = keep[level.embed]
        self._counting = True
        try:
            with self._autocast():
                loss, main, mtp = compute_losses(self.model, pb, cfg.mtp_weight, trunk_grad=not cfg.mtp_only)
        finally:
            self._counting = False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.grad_clip and cfg.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        else:
            gnorm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        self.optimizer.step()
        self._update_router_bias()
        self.step += 1
        self.tokens_seen += pb.real_tokens
        rec = {"loss": loss.item(), "main_loss": main.item(), "mtp_loss": None if mtp is None else mtp.item(),
               "lr": lr, "grad_norm": gnorm, "tokens": pb.real_tokens, "padded_tokens": pb.num_tokens,
               "moe_imbalance": self.last_imbalance}
        h = self.history
        h["step"].append(self.step)
        for k in ("loss", "main_loss", "mtp_loss", "lr", "grad_norm", "tokens"):
            h[k].append(rec[k])
        return rec

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Main next-token loss on a fixed held-out batch (seeds >= 10**9)."""
        if self._eval_batch is None:
            stream = ExampleStream(self.template, self.tokenizer, self.cfg.seq_len, self.cfg.data_seed,
                                   self.cfg.mix, self.cfg.task_opts, held_out=True)
            self._eval_batch, _ = stream.next_batch(0, self.cfg.eval_tokens, self.cfg.pad_multiple, self.pad_id,
                                                    with_mtp=False)
        self.model.eval()
        with self._autocast():
            _, main, _ = compute_losses(self.model, self._eval_batch.to(self.device), 0.0)
        self.model.train()
        return float(main)

    # ---- checkpoints
    def save_checkpoint(self) -> Path:
        from ..weights import save_hf_checkpoint
        from .tokenizer import copy_tokenizer_files

        root = self.out / CHECKPOINTS
        final = root / f"step_{self.step:07d}"
        tmp = root / (final.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_hf_checkpoint(self.model, tmp)
        copy_tokenizer_files(self.tokenizer_dir, tmp)
        save_optimizer(self.model, self.optimizer, tmp / OPTIMIZER_FILE)
        state = {"format": STATE_FORMAT, "step": self.step, "cursor": self.cursor, "tokens_seen": self.tokens_seen,
                 "train_seconds": self.train_seconds, "seed": self.cfg.seed, "data_seed": self.cfg.data_seed,
                 "seq_len": self.cfg.seq_len,
                 "history": self.history, "train_config": self.cfg.to_json()}
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if self.cfg.keep_checkpoints > 0:
            done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
            for old in done[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        return final

    def _load_state(self, directory: Path) -> None:
        state = json.loads((directory / STATE_FILE).read_text())
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{directory / STATE_FILE}: unknown trainer state format {state.get('format')!r}")
        self.step, self.cursor = int(state["step"]), int(state["cursor"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.history = state["history"]
        if state.get("data_seed", self.cfg.data_seed) != self.cfg.data_seed:
            self.log("hylm train: warning: data_seed differs from the checkpoint's; the data stream changes")
        load_optimizer(self.model, self.optimizer, directory / OPTIMIZER_FILE)

    def save_final(self) -> Path:
        from ..weights import save_hf_checkpoint
        from .tokenizer import copy_tokenizer_files

        save_hf_checkpoint(self.model, self.out)
        copy_tokenizer_files(self.tokenizer_dir, self.out)
        state = {"format": STATE_FORMAT, "step": self.step, "tokens_seen": self.tokens_seen,
                 "train_seconds": round(self.train_seconds, 1),
                 "seq_len": self.cfg.seq_len, "train_config": self.cfg.to_json(),
                 "final_loss": self.history["loss"][-1] if self.history["loss"] else None}
        (self.out / "train_summary.json").write_text(json.dumps(state, indent=2) + "\n")
        return self.out

    def plot(self) -> Path | None:
        return plot_loss_curve(self.history, self.out / "loss_curve.png", log=self.log)

    # ---- the loop
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, unit="step", dynamic_ncols=True,
                   desc="train")
        log_file = open(self.out / "train_log.jsonl", "a", encoding="utf-8")
        t_run = time.perf_counter()
        tokens_run = 0
        window_tokens, window_time = 0, 0.0
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                pb = self.next_batch()
                rec = self.train_step(pb)
                dt = time.perf_counter() - t0
                self.train_seconds += dt
                tokens_run += pb.real_tokens
                window_tokens += pb.real_tokens
                window_time += dt
                tok_s = window_tokens / max(window_time, 1e-9)
                bar.update(1)
                post = {"loss": f"{rec['loss']:.4f}", "tok/s": f"{tok_s:.0f}", "lr": f"{rec['lr']:.2e}"}
                if rec["mtp_loss"] is not None:
                    post["mtp"] = f"{rec['mtp_loss']:.3f}"
                bar.set_postfix(post, refresh=False)
                if cfg.eval_interval and self.step % cfg.eval_interval == 0:
                    ev = self.eval_loss()
                    self.history["eval"].append([self.step, ev])
                    rec["eval_loss"] = ev
                if self.step % max(1, cfg.log_interval) == 0 or self.step == cfg.steps or "eval_loss" in rec:
                    log_file.write(json.dumps({"step": self.step, **rec, "tok_per_s": round(tok_s, 1),
                                               "examples": pb.num_examples, "cursor": self.cursor}) + "\n")
                    log_file.flush()
                    window_tokens, window_time = 0, 0.0
                if cfg.save_interval and self.step % cfg.save_interval == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                    if cfg.plot:
                        self.plot()
        finally:
            bar.close()
            log_file.close()
        elapsed = time.perf_counter() - t_run
        ckpt = self.save_checkpoint()
        self.save_final()
        png = self.plot() if cfg.plot else None
        summary = {"steps": self.step, "final_loss": self.history["loss"][-1] if self.history["loss"] else None,
                   "tokens": tokens_run, "seconds": elapsed, "tokens_per_s": tokens_run / max(elapsed, 1e-9),
                   "checkpoint": str(ckpt), "out_dir": str(self.out), "loss_curve": str(png) if png else None}
        return summary

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


_PLOT_NOTICE_SHOWN = False


def plot_loss_curve(history: dict[str, list], path: str | os.PathLike,
                    log: Callable[[str], None] | None = None) -> Path | None:
    """Loss (and MTP / held-out loss) against step as a PNG; None, with a notice, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        global _PLOT_NOTICE_SHOWN
        if log is not None and not _PLOT_NOTICE_SHOWN:
            _PLOT_NOTICE_SHOWN = True
            log("hylm train: matplotlib is not installed, skipping the loss curve PNG "
                "(pip install matplotlib to get it)")
        return None
    steps = history["step"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    values: list[float] = []

    def curve(xs: list, ys: list, label: str) -> None:
        values.extend(ys)
        if len(ys) > 50:  # noisy per-step losses: faint raw line plus a centred moving average
            line, = ax.plot(xs, ys, linewidth=0.6, alpha=0.3)
            half = max(2, len(ys) // 80)
            sums = [0.0]
            for y in ys:
                sums.append(sums[-1] + y)
            smooth = [(sums[min(len(ys), i + half + 1)] - sums[max(0, i - half)])
                      / (min(len(ys), i + half + 1) - max(0, i - half)) for i in range(len(ys))]
            ax.plot(xs, smooth, color=line.get_color(), linewidth=1.2, label=f"{label} (smoothed)")
        else:
            ax.plot(xs, ys, linewidth=1, label=label)

    if steps:
        curve(steps, history["main_loss"], "next-token loss")
        mtp = [(s, v) for s, v in zip(steps, history["mtp_loss"]) if v is not None]
        if mtp:
            curve([s for s, _ in mtp], [v for _, v in mtp], "MTP loss (token after next)")
    if history.get("eval"):
        ys = [v for _, v in history["eval"]]
        values.extend(ys)
        ax.plot([s for s, _ in history["eval"]], ys, "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 10:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if values:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    trainer = Trainer(cfg, log)
    try:
        return trainer.run()
    finally:
        trainer.close()
