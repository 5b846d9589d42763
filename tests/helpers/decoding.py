"""Prompt encoding and bad-value checks shared by the engine and drafter tests."""

from __future__ import annotations

from typing import List, Sequence

import pytest

from decodelab.drafters.registry import REGISTRY, drafter_config
from decodelab.errors import UserError
from decodelab.experiment.compose import compose, validate
from decodelab.experiment.runner import chat_template_ids


def encode_chat(tokenizer, text: str) -> List[int]:
    """One user turn through the model's chat template, ready for the answer."""
    return chat_template_ids(tokenizer, [{"role": "user", "content": text}])


def assert_bad_value_is_named(option: str, override: str, key: str, extra: Sequence[str] = (),
                              group: str = "drafter") -> None:
    """``<group>=<option> <override>`` fails validation with one line that names ``key``."""
    cfg = compose([f"{group}={option}", override, *extra, "tracking=none"])
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def assert_registered_with_yaml_defaults(name: str, schema: type) -> None:
    """conf/drafter/<name>.yaml composes to exactly the schema's defaults, and the registry maps the name to it."""
    assert REGISTRY[name].config_class is schema
    typed = drafter_config(compose([f"drafter={name}", "tracking=none"]).drafter)
    assert typed == schema()
    typed.validate("drafter")
