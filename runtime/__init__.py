"""dsv4rt: a hardware-portable inference runtime for DeepSeek-V4-family models.

`from runtime import Runtime` is the Python API; `python -m runtime.run` the CLI;
`python -m runtime.checkpoint make` writes the small official-layout checkpoint used by demo and tests.
"""

import os

# torch's OpenMP workers spin ~10-15 ms after each parallel region by libgomp's default: on a small box that spin
# takes the core the fused decode step's own pool needs (measured on 2 cores: plain greedy decode 159 -> 130 us a
# token, prefill unchanged). Only the default changes (a user's setting wins), and only where torch is imported
# after this package -- the CLIs, the server.
os.environ.setdefault("GOMP_SPINCOUNT", "3000")

from .errors import CheckpointError, ConfigError, InputError, V4Error  # noqa: E402

__all__ = ["Runtime", "V4Error", "ConfigError", "CheckpointError", "InputError"]


def __getattr__(name):
    # Lazy: importing the package stays cheap (its one side effect: the OpenMP spin default above).
    if name == "Runtime":
        from .api import Runtime

        return Runtime
    raise AttributeError(name)
