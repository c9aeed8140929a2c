"""User-facing error types: one per kind of failure, each message says what to do."""


class NanochatError(Exception):
    """Base class for errors a user can fix without reading a traceback."""


class ConfigError(NanochatError, ValueError):
    """A config name, field or value is wrong (raised before any compute)."""


class DataError(NanochatError):
    """A corpus source is missing, empty, or too small for the requested batches."""


class CheckpointError(NanochatError):
    """A checkpoint cannot be resumed with this config (different model or data)."""


class DivergenceError(NanochatError, FloatingPointError):
    """Training kept producing NaN/inf values: `training.max_consecutive_skips` updates in
    a row were skipped."""


class EvalError(NanochatError):
    """An evaluation cannot run: no Rust compiler, or a malformed problem file."""


class ExportError(NanochatError):
    """A model cannot be written in the requested format (says what would make it fit)."""
