"""dsv4rt: a hardware-portable inference runtime for DeepSeek-V4-family models.

`from runtime import Runtime` is the Python API; `python -m runtime.run` the CLI;
`python -m runtime.checkpoint make` writes the small official-layout checkpoint used by demo and tests.
"""

from .errors import CheckpointError, ConfigError, InputError, V4Error

__all__ = ["Runtime", "V4Error", "ConfigError", "CheckpointError", "InputError"]


def __getattr__(name):
    # Lazy: importing the package stays cheap and side-effect free.
    if name == "Runtime":
        from .api import Runtime

        return Runtime
    raise AttributeError(name)
