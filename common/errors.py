"""Errors a user can cause. The CLI turns these into one line and exit code 2."""


class UserError(Exception):
    """A problem with the user's input (option, dataset, device); the message names the fix."""


class DataError(UserError):
    """A dataset is missing, corrupt or not in the expected layout."""


class ConfigError(UserError, ValueError):
    """An option value is out of range or unknown."""
