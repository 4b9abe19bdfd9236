"""Official-layout checkpoints: the tensor inventory, the loader, the small-model generator, and the fingerprint
(`fingerprint.checkpoint_fingerprint`: what identifies a checkpoint's weights, for caches, manifests and reports)."""

from .loader import CheckpointReader, LoadedCheckpoint, Stored, load_checkpoint
from .make import make_preset, make_weights, write_checkpoint

__all__ = ["CheckpointReader", "Stored", "LoadedCheckpoint", "load_checkpoint", "make_preset", "make_weights", "write_checkpoint"]
