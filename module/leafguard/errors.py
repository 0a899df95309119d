"""The exception hierarchy: one root, one branch per subsystem.

Expected failures (a corrupt capture file, an invalid twin patch, a missing capability) are raised as one of
these and turned into a one-line message or a reported error; anything else is a bug and is left to crash.
"""


class LeafGuardError(Exception):
    """Root of every error LeafGuard raises on purpose."""


class CaptureFileError(LeafGuardError):
    """A capture file cannot be read: missing, corrupt, or of an unsupported link type."""


class CaptureError(LeafGuardError):
    """Live capture cannot start or continue (no capability, no interface, bad filter)."""


class ConfigurationError(LeafGuardError):
    """A setting or a twin configuration is invalid; the previous configuration stays in force."""
