"""Typed errors. Every user-facing failure raises one of these, with a message that names the
field, file or tensor at fault. Each also subclasses the builtin a caller would naturally catch."""


class JaxserveError(Exception):
    """Base of every error jaxserve raises on purpose."""


class InvalidRequestError(JaxserveError, ValueError):
    """A prompt or sampling parameter is unusable (empty, too long, out of range)."""


class ConfigError(JaxserveError, ValueError):
    """A config file or model config is malformed or unsupported."""


class CheckpointError(JaxserveError, ValueError):
    """A checkpoint is missing, truncated, corrupt or does not match its config."""


class FetchError(JaxserveError, RuntimeError):
    """Downloading or verifying the default model failed."""


class AddressInUseError(JaxserveError, OSError):
    """A port the server was asked to listen on is taken (by another server, most likely)."""
