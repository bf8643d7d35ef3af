"""Errors a user can cause. The CLI turns these into one line and exit code 2."""


class UserError(Exception):
    """A problem with the user's input (option, dataset, device); the message names the fix."""


class DataError(UserError):
    """A dataset is missing, corrupt or not in the expected layout."""


class ConfigError(UserError, ValueError):
    """An option value is out of range or unknown.

    ``field``: the Recipe / RunSpec field the value belongs to, when there is
    one, so the CLI can name the flag that sets it (compare.options) without
    guessing from the message.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
