"""Errors caused by the user's input; the CLI prints them as one line, no traceback."""


class UserError(Exception):
    """Bad input: the message names the file, key or value and what was expected."""


class ConfigError(UserError):
    """A config file, key, value or override is wrong."""


class DataError(UserError):
    """A data directory, file or array is missing, corrupt or of the wrong shape."""


class OutputError(UserError):
    """An output directory or file cannot be used: in use, not writable, full, or not a directory."""


class ParameterError(UserError):
    """A bad value of a named parameter of a library call (``hash_bits 80: ...``). Library
    code stays neutral; the command line names the flag instead (``--hash-bits 80: ...``)."""

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(f"{param}{detail}")
        self.param = param
        self.detail = detail

    def as_flag(self) -> str:
        return f"--{self.param.replace('_', '-')}{self.detail}"
