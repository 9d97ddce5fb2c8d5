"""User-facing errors. Each message says what was wrong and what to change.

The CLI prints these without a traceback; anything else that escapes is a bug.
"""


class RetrievalAttnError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(RetrievalAttnError, ValueError):
    """A config file or value is unknown, mistyped or impossible."""


class ModelLoadError(RetrievalAttnError):
    """A model path is missing, unreadable or of an unsupported architecture."""


class RequestError(RetrievalAttnError, ValueError):
    """A prompt or its sampling parameters cannot be served as given."""
