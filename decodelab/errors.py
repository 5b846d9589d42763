"""User-facing errors: anything a user can fix by changing input becomes one line and exit code 2."""

from __future__ import annotations

from typing import Callable, List, Optional


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


def one_line(err: BaseException, allowed_keys: Optional[Callable[[str], List[str]]] = None) -> str:
    """The most specific message in an exception chain, on one line, led by the full key when known.

    ``allowed_keys(full_key)`` names the keys allowed beside an unknown one (the composer knows them).
    """
    chain = []
    current: Optional[BaseException] = err
    while current is not None and len(chain) < 6:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for exc in reversed(chain):
        full_key = getattr(exc, "full_key", None)
        msg = getattr(exc, "msg", None) or str(exc)
        if full_key:
            first = msg.strip().splitlines()[0]
            if type(exc).__name__ == "ConfigKeyError" or " not in " in first:
                allowed = allowed_keys(full_key) if allowed_keys else []
                return f"{full_key}: unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
            return f"{full_key}: {first}"
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text or type(err).__name__
