"""The backend interface: probe the device at load time, report capabilities, never at import."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from runtime.errors import V4Error


class BackendUnavailable(V4Error):
    """The backend's device or library is not usable on this machine (one line: what is missing, how to fix)."""


@dataclass(frozen=True)
class DeviceInfo:
    backend: str
    device: str                       # torch device string the backend computes on
    name: str                         # human-readable device name
    details: dict = field(default_factory=dict)


class Backend(Protocol):
    name: str

    def probe(self) -> DeviceInfo:
        """Find the device; raise BackendUnavailable (one line) when it cannot be used."""

    def capabilities(self, info: DeviceInfo) -> frozenset[str]:
        """What this device can do (names from runtime.profile.CAPABILITIES)."""

    # The weight formats this backend's ops run in their own storage (the CPU runs every format's values).
    weight_formats: frozenset[str]

    def load_weights(self, reader, weight_format: str, compute_dtype: str, device, int8_linears):
        """Stream `reader.tensors()` (runtime.checkpoint.CheckpointReader or a rank's ShardedReader) into this
        backend's storage, one tensor at a time -> runtime.weights.Weights."""
