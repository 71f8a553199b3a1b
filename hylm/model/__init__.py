"""The Nemotron-H model in PyTorch: one file per block kind plus the assembled model."""

from .batch import Batch, State
from .cache import ContiguousCache
from .nemotron_h import NemotronHModel

__all__ = ["Batch", "State", "ContiguousCache", "NemotronHModel"]
