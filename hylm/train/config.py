"""`TrainConfig`: every knob of a training run (kept free of torch so the CLI can build its flags fast)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainConfig:
    model: Any = "hylm-tiny"  # ModelConfig, config dict, config.json, model dir or preset (micro, hylm-tiny)
    out_dir: str = "runs/hylm-tiny"
    tokenizer: str | None = None  # directory with tokenizer.json; None: reuse or train one (into out_dir)
    tokenizer_corpus: int = 5000  # examples rendered to train the tokenizer when one is trained
    init_from: str | None = None  # continue training from this checkpoint's weights (fresh optimizer, step 0)
    resume: bool = False  # continue from the latest checkpoint in out_dir (weights, optimizer, data, history)
    steps: int = 1000  # total optimizer steps of the run
    batch_tokens: int = 8192  # tokens per step (examples are added while they fit)
    seq_len: int = 512  # longer examples are truncated
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    mtp_weight: float = 0.3
    mtp_depth: int = 1  # MTP levels trained (draft 1..D of speculative decoding, shared weights)
    mtp_only: bool = False  # train the MTP block alone: every other weight (embeddings, head) stays as it is
    router_bias_rate: float = 1e-3  # 0: no balancing update
    seed: int = 0  # weight initialisation
    data_seed: int = 0  # first example seed
    mix: dict[str, float] | None = None  # task -> weight (curriculum.DEFAULT_MIX)
    task_opts: dict[str, dict[str, Any]] | None = None  # task -> generate_example options
    device: str = "cpu"
    dtype: str = "fp32"  # fp32, or bf16 (autocast, fp32 master weights; meant for GPUs)
    threads: int | None = None  # torch CPU threads
    log_interval: int = 10
    eval_interval: int = 0  # held-out loss every N steps (0: off)
    eval_tokens: int = 4096
    save_interval: int = 500  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    # pad each sequence (masked, not counted as MoE load) to a multiple of this: fewer distinct lengths per
    # batch, so fewer separate Mamba scans; 32 was ~5-8% faster on CPU for hylm-tiny (1 = no padding)
    pad_multiple: int = 1
    progress: bool = True
    plot: bool = True

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if hasattr(self.model, "to_hf_dict"):  # a ModelConfig
            d["model"] = self.model.to_hf_dict()
        return d
