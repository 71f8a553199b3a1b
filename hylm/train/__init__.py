"""Training for hylm's own small Nemotron-3-shaped models (`hylm train`, `python -m hylm.train`).

* `curriculum` -- a seeded synthetic curriculum in the chat format, and rendering with a loss mask.
* `tokenizer` -- a byte-level BPE with Nemotron 3's special-token ids.
* `trainer` -- the training loop (AdamW, warmup + cosine, clipping, packing, MTP, checkpoints, resume).
* `config` -- `TrainConfig`; `configs` -- model configs for training (`micro` for tests, `hylm-tiny`).
* `cli` -- the command-line flags shared by `hylm train` and `python -m hylm.train`.

Heavy modules (torch) are imported lazily by the submodules that need them.
"""
