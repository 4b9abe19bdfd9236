"""The backend interface: what one device path owns, from the probe to the weights and the process group.

A backend is a small object (`Backend` below gives every hook but `probe` / `capabilities` / `load_weights` a
default): it probes its device at load time (never at import), reports the device's capabilities (dispatch
intersects them with the profile's), streams the checkpoint into its own weight storage, or, for a backend
that runs a whole exported graph, builds that model instead; it names its default hardware profile, its
torch.distributed backend and the device of each rank, and describes where a model's work runs.
`Runtime.load` calls these hooks in order and knows no backend by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.errors import V4Error
from runtime.plan.memory import PREFILL_CHUNK


class BackendUnavailable(V4Error):
    """The backend's device or library is not usable on this machine (one line: what is missing, how to fix)."""


@dataclass(frozen=True)
class DeviceInfo:
    backend: str
    device: str                       # torch device string the backend computes on
    name: str                         # human-readable device name
    details: dict = field(default_factory=dict)


class Backend:
    name: str
    # The weight formats this backend's ops run in their own storage (the CPU runs every format's values).
    weight_formats: frozenset[str] = frozenset()
    default_profile: str = ""         # the profile `--backend NAME` alone picks
    # True where the backend computes every weight format's and dtype's values exactly (the CPU: that is what
    # emulation is), so a profile's capability needs are not checked against the device.
    computes_every_format: bool = False
    # Tokens per forward call of a prompt (generate's prefill; what the memory plan sizes activations for).
    prefill_chunk: int = PREFILL_CHUNK
    # A backend that runs a whole exported graph builds the model itself: build_model(checkpoint, profile,
    # progress, threads, chunk) -> an object with forward / new_state / cfg / device / folder (None: the torch
    # Transformer over `load_weights`).
    build_model = None

    def probe(self) -> DeviceInfo:
        """Find the device; raise BackendUnavailable (one line) when it cannot be used."""
        raise NotImplementedError

    def capabilities(self, info: DeviceInfo) -> frozenset[str]:
        """What this device can do (names from runtime.profile.CAPABILITIES)."""
        raise NotImplementedError

    def load_weights(self, reader, weight_format: str, compute_dtype: str, device, int8_linears):
        """Stream `reader.tensors()` (runtime.checkpoint.CheckpointReader or a rank's ShardedReader) into this
        backend's storage, one tensor at a time -> runtime.weights.Weights."""
        raise NotImplementedError

    def open(self, profile, weight_format: str, needed: frozenset[str]) -> tuple[DeviceInfo, frozenset[str]]:
        """Probe the device and check it can run `profile` in `weight_format` with the capabilities `needed`
        (runtime.profile.capabilities_needed) -> (device info, probed capabilities); one line when it cannot."""
        info = self.probe()
        caps = self.capabilities(info)
        missing = frozenset() if self.computes_every_format else needed - caps
        if missing:
            raise BackendUnavailable(f"profile {profile.name} needs {', '.join(sorted(missing))} but {info.name} "
                                     f"({info.device}) does not have it; choose a profile for this device, or add "
                                     "--emulate to run this profile's numerics on the CPU")
        if weight_format not in self.weight_formats:
            raise BackendUnavailable(f"backend {info.backend!r} cannot run weight format {weight_format!r} in this "
                                     f"build (it runs {', '.join(sorted(self.weight_formats))}); choose such a "
                                     "profile, or add --emulate to run this profile's numerics on the CPU")
        return info, caps

    def process_group_backend(self) -> str | None:
        """The torch.distributed backend of a multi-device run (registering it where a library must); None:
        this backend has no multi-device run."""
        return None

    def rank_device(self, local_rank: int):
        """The device rank `local_rank` of this node computes on in a multi-device run."""
        import torch

        return torch.device("cpu")

    def decode_runner(self, model, profile, table):
        """What runs generate's one-token decode steps: None (the default) = the model's eager forward; a backend
        may return a runner (e.g. CUDA graphs for `graph_mode: cudagraph`, backends/cuda_graphs.py) with
        `session(seqs, tokens)` and `describe()`."""
        return None

    def placement(self, model) -> list[str]:
        """Lines saying where the model's work runs beyond the dispatch table (an exported graph: its nodes by
        execution provider); none for a torch model, whose table says it all."""
        return []
