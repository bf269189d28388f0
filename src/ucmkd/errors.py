"""Exceptions raised by ucmkd. Every message names the file, field, name or shape at fault."""


class UcmkdError(Exception):
    """Base class of all ucmkd errors."""


class ConfigError(UcmkdError, ValueError):
    """A config field, name or override is invalid."""


class DataError(UcmkdError, ValueError):
    """A dataset, file, label set or tensor shape is invalid."""


class NumericalError(UcmkdError, FloatingPointError):
    """A loss or gradient became NaN/inf, or training diverged."""
