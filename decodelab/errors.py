"""User-facing errors: anything a user can fix by changing input becomes one line and exit code 2."""

from __future__ import annotations

import sys
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


def warn(message: str) -> None:
    """One line on stderr for what went wrong but did not stop the work (a remote down, a report not logged):
    every layer warns through here, in one format."""
    print(f"decodelab: warning: {message}", file=sys.stderr, flush=True)


def notice(message: str) -> None:
    """One line on stderr about what a command did on its own (reused an earlier run, skipped a job)."""
    print(f"decodelab: {message}", file=sys.stderr, flush=True)


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
                allowed = _schema_keys(getattr(exc, "object_type", None))
                if not allowed and allowed_keys:
                    allowed = allowed_keys(full_key)
                return f"{full_key}: unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
            return f"{full_key}: {first}"
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return text or type(err).__name__


def _schema_keys(schema: object) -> List[str]:
    """The fields of the dataclass that rejected a key (the node's own schema: a drafter's, the model's, ...)."""
    import dataclasses

    return [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
