"""One way to parse the arguments of the commands over recorded results (report, reproduce, simulate):
one positional SOURCE, ``--flag VALUE`` / ``--flag=VALUE`` options (some repeatable), and for some
commands Hydra-style overrides after SOURCE. Every mistake is a one-line UserError naming the argument."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

from decodelab.errors import UserError


@dataclass
class Command:
    name: str
    source: str  # what the positional argument is, e.g. RUN
    # flag -> metavar, e.g. {"--out": "DIR"}
    options: Dict[str, str]
    repeatable: Tuple[str, ...] = ()
    # Overrides (key=value, +key=value, ~key) after SOURCE.
    overrides: bool = False
    # Override-style spellings of an option, e.g. tracking.mlflow.tracking_uri=URI for --tracking-uri.
    aliases: Dict[str, str] = field(default_factory=dict)
    # The -h text; a callable when it names what is known only at run time (e.g. the registered drafters).
    usage: Union[str, Callable[[], str]] = ""


@dataclass
class Parsed:
    source: str
    values: Dict[str, object]
    overrides: List[str]

    def value(self, flag: str, default: Optional[str] = None) -> Optional[str]:
        return self.values.get(flag, default)  # type: ignore[return-value]


def parse(command: Command, args: List[str]) -> Optional[Parsed]:
    """The parsed arguments, or None after printing the usage for -h/--help."""
    if args and args[0] in ("-h", "--help"):
        print(command.usage() if callable(command.usage) else command.usage)
        return None
    allowed = ", ".join(f"{flag} {metavar}" for flag, metavar in command.options.items())
    source: Optional[str] = None
    values: Dict[str, object] = {flag: [] for flag in command.repeatable}
    overrides: List[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        key, sep, value = arg.partition("=")
        flag = command.aliases.get(key, key) if sep else key
        if flag in command.options and (arg.startswith("-") or key in command.aliases):
            if not sep:
                if not rest:
                    raise UserError(f"{flag}: needs a value, e.g. {flag} {command.options[flag]}")
                value = rest.pop(0)
            if not value:
                raise UserError(f"{flag}: needs a non-empty value")
            if flag in command.repeatable:
                values[flag].append(value)  # type: ignore[union-attr]
            else:
                values[flag] = value
        elif arg.startswith("-"):
            raise UserError(f"{command.name}: unexpected argument {arg!r}; allowed: {allowed}")
        elif source is None and not sep and not arg.startswith(("~", "+")):
            source = arg
        elif command.overrides and source is not None and (sep or arg.startswith("~")):
            overrides.append(arg)
        elif command.overrides and source is not None:
            raise UserError(f"{arg}: expected an override key=value after {command.source} "
                            f"(one {command.source} per command)")
        else:
            raise UserError(f"{command.name}: unexpected argument {arg!r}; {command.usage}")
    if source is None:
        raise UserError(f"{command.name} needs {command.source}; {command.usage}")
    return Parsed(source, values, overrides)
