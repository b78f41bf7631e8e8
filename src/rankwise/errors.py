"""User-facing errors: each says what was wrong, where, and how to fix it."""


class RankwiseError(Exception):
    """Base class for every error rankwise raises on bad input."""


class ModelLoadError(RankwiseError):
    """A model name or path could not be resolved or read."""


class DataError(RankwiseError):
    """A data source is missing, malformed or empty."""


class TargetError(RankwiseError):
    """The target specification matched nothing or something that cannot be adapted."""


class CalibrationError(RankwiseError):
    """Calibration could not produce valid statistics (no tokens, NaN/inf activations)."""


class PlanError(RankwiseError):
    """A plan cannot be made from these statistics and settings."""


class ConfigError(RankwiseError):
    """A configuration key or value is invalid."""


class QuantError(RankwiseError):
    """A model or layer cannot be quantized as asked."""


class DistributedError(RankwiseError):
    """A multi-process run cannot go on: another rank failed, or the processes disagree."""


class MemoryBudgetError(RankwiseError):
    """The estimated peak memory of a run exceeds what the machine (or GPU) has."""


class DiskSpaceError(RankwiseError):
    """The output (or the hidden-state cache) would not fit on the disk it goes to."""
