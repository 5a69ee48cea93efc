"""User-facing errors: each message names the problem and its fix; the CLI prints no traceback."""


class InstillError(Exception):
    """Base class for errors caused by the user's input (config, files, targets), not by a bug."""


class ConfigError(InstillError, ValueError):
    """A config key, type or value is wrong."""


class TargetError(InstillError, ValueError):
    """Mask targets match nothing, or name parameters the model lacks."""


class SubnetworkMismatchError(InstillError, ValueError):
    """A subnetwork does not fit the model it is applied to (other names or shapes)."""


class FileFormatError(InstillError, ValueError):
    """A file is unreadable, truncated, corrupt or of an unsafe format."""


class ExpressionError(InstillError, ValueError):
    """A malformed arithmetic expression; the message points at the position."""


class ModelStateError(InstillError, ValueError):
    """A model is in the wrong state for the call (masks or a transplant still attached)."""


class TrainingError(InstillError, RuntimeError):
    """Training diverged (a NaN or infinite loss); the message gives the step and a hint."""
