"""Shared fixtures. Checkpoints of the tiny transformers models (tests/hf_models.py) are built once per
session and reused by every test that asks for them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis  # noqa: F401  imported up front: its plugin's late import at session end, while engine
# threads exist, trips a CPython 3.11 bug in ast.parse ("AST constructor recursion depth mismatch")
import pytest


@dataclass
class HFCheckpoint:
    name: str
    kwargs: dict[str, Any]
    model: Any  # transformers NemotronHForCausalLM, fp32, eval, time_step_limit fixed
    dirs: dict[str, Path] = field(default_factory=dict)  # layout -> checkpoint directory


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """`get(name)` -> HFCheckpoint for `hf_models.CONFIGS[name]`, saved in three layouts:
    "hf" (transformers' save_pretrained), "v5" (`model.` prefix, stacked experts, as in memory) and
    "nvidia" (`backbone.` prefix, per-expert tensors, 2 shards + index, legacy config keys)."""
    pytest.importorskip("transformers")
    import hf_models

    built: dict[str, HFCheckpoint] = {}

    def get(name: str) -> HFCheckpoint:
        if name not in built:
            kwargs = hf_models.CONFIGS[name]
            model = hf_models.make_hf_model(kwargs, seed=sorted(hf_models.CONFIGS).index(name))
            root = tmp_path_factory.mktemp(f"hf_{name}")
            ck = HFCheckpoint(name, kwargs, model)
            ck.dirs["hf"] = hf_models.save_hf(model, root / "hf")
            ck.dirs["v5"] = hf_models.save_v5_stacked(model, root / "v5")
            ck.dirs["nvidia"] = hf_models.resave_nvidia_style(ck.dirs["hf"], root / "nvidia", shards=2)
            built[name] = ck
        return built[name]

    return get
