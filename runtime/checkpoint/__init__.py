"""Official-layout checkpoints: the tensor inventory, the loader, and the small-model generator."""

from .loader import LoadedCheckpoint, load_checkpoint
from .make import make_preset, make_weights, write_checkpoint

__all__ = ["LoadedCheckpoint", "load_checkpoint", "make_preset", "make_weights", "write_checkpoint"]
