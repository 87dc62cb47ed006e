"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user: a config, a path, a shard pattern, a checkpoint."""


class ConfigError(UserError):
    """A config file or override that does not fit the config tree."""


class DataError(UserError):
    """Shards that cannot be found or read."""


class CheckpointError(UserError):
    """A checkpoint or run directory that cannot be used."""


class StorageError(UserError):
    """A file the job must write that cannot be written: a full disk, a read-only folder."""


class DivergedError(UserError):
    """Training stopped: too many steps in a row with a non-finite loss or gradient."""


class ResourceError(UserError):
    """The job needs more memory than the device or machine has."""
