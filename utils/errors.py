"""Errors caused by the user's input; the CLI prints them as one line, no traceback."""


class UserError(Exception):
    """Bad input: the message names the file, key or value and what was expected."""


class ConfigError(UserError):
    """A config file, key, value or override is wrong."""


class DataError(UserError):
    """A data directory, file or array is missing, corrupt or of the wrong shape."""


class OutputError(UserError):
    """An output directory or file cannot be used: in use, not writable, full, or not a directory."""
