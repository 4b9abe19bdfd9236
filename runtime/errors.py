"""User-facing errors of the runtime.

Every problem a user can cause (bad checkpoint, bad config, bad input, bad sampling values) is raised as a
`V4Error` whose message is one line naming the problem and the fix. The CLIs print that line and exit 2 (runtime/cli.py);
anything else escaping is a bug in the runtime, not in the user's input.
"""


class V4Error(Exception):
    """A one-line, user-actionable error."""

    exit_status = 2            # what a CLI exits with (runtime/cli.py)
    leave_at_once = False      # True: the CLI exits without interpreter teardown (a broken process group)


class ConfigError(V4Error):
    """The model config (config.json or preset) is missing keys or holds impossible values."""


class CheckpointError(V4Error):
    """The checkpoint on disk is missing, truncated, corrupt or does not match its config."""


class InputError(V4Error):
    """Token ids, prompt length, sampling values or state passed to the runtime are invalid."""
