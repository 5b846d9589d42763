"""User-facing errors: anything a user can fix by changing input becomes one line and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (config value, missing file/package, unavailable device).

    The CLI prints ``decodelab: error: <message>`` on one line and exits with code 2.
    The message must name the bad key or value and what is allowed.
    """

    exit_code = 2


class ConfigError(UserError):
    """A config key or value is invalid."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless condition holds."""
    if not condition:
        raise ConfigError(key, message)
