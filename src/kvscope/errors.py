"""Exceptions that name the problem, so that a user can fix the input that caused it."""


class KVScopeError(Exception):
    """Base class of every error kvscope raises on purpose."""


class ConfigError(KVScopeError, ValueError):
    """A configuration value (engine, strategy, sampling, study spec) is invalid."""


class ModelLoadError(KVScopeError):
    """A model name, path, checkpoint or GGUF file cannot be resolved or read."""


class RequestError(KVScopeError, ValueError):
    """A single request cannot be served (too long for the context or for the KV pool)."""


class DatasetError(KVScopeError):
    """A data set or text source is missing (names the pip package to install) or unreadable."""
