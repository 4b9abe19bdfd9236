"""Official-layout checkpoints: the tensor inventory, the loader, and the small-model generator."""

from .loader import CheckpointReader, LoadedCheckpoint, Stored, load_checkpoint
from .make import make_preset, make_weights, write_checkpoint

__all__ = ["CheckpointReader", "Stored", "LoadedCheckpoint", "load_checkpoint", "make_preset", "make_weights", "write_checkpoint"]
