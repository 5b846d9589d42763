"""Adding a drafter is one module and one YAML: a throwaway drafter, written to a temp folder with no edit
anywhere else, is discovered, composed, validated and run end to end (lossless against its own baseline)."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest

import decodelab.drafters as drafters_package
from decodelab.drafters import registry
from decodelab.experiment.compose import compose, conf_dir, group_options, validate
from decodelab.experiment.runner import run

pytestmark = pytest.mark.usefixtures("one_thread")

MODULE = '''
"""drafter=echo_last: proposes the last context token, k times (a real proposer, if a poor one)."""
from dataclasses import dataclass
from typing import Sequence

from decodelab.config import DrafterConfig
from decodelab.decoding.types import Draft
from decodelab.drafters.base import Drafter
from decodelab.errors import check


@dataclass
class EchoLastConfig(DrafterConfig):
    name: str = "echo_last"
    k: int = 2

    def validate(self, key: str = "drafter") -> None:
        check(self.k >= 1, f"{key}.k", f"must be >= 1, got {self.k}")

    def set_draft_length(self, length: int) -> None:
        self.k = length


class EchoLastDrafter(Drafter):
    name = "echo_last"
    config_class = EchoLastConfig
    draft_length_key = "k"

    def __init__(self, cfg, **_parts):
        self.cfg = cfg

    def propose(self, context: Sequence[int]) -> Draft:
        return Draft(tokens=[context[-1]] * self.cfg.k)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    (code / "echo_last.py").write_text(textwrap.dedent(MODULE), encoding="utf-8")
    conf = tmp_path / "conf"
    shutil.copytree(conf_dir(), conf)
    # A delta over the schema the registry stored for it: only k differs from EchoLastConfig's defaults.
    (conf / "drafter" / "echo_last.yaml").write_text(
        "# Echo the last token.\ndefaults:\n  - /schema/drafter/echo_last@_here_\n  - _self_\nk: 3\n",
        encoding="utf-8")
    monkeypatch.setenv("DECODELAB_CONF_DIR", str(conf))
    monkeypatch.setattr(drafters_package, "__path__", [*drafters_package.__path__, str(code)])
    registry.discover()
    yield tmp_path
    monkeypatch.undo()
    registry.discover()


def test_a_new_drafter_module_and_yaml_run_end_to_end(plugin):
    assert "echo_last" in registry.REGISTRY and "echo_last" in group_options("drafter")
    assert "echo_last" in registry.draft_length_drafters()
    overrides = ["model=tiny-random", "drafter=echo_last", "task.limit=2", "task.max_new_tokens=12",
                 "tracking=none", "progress=false", "print_table=false", "baseline=fresh"]
    validate(compose(overrides))
    composed = compose(overrides).drafter
    assert (composed.name, composed.k) == ("echo_last", 3)  # the schema's name, the YAML's k
    with pytest.raises(Exception, match=r"drafter\.kk: unknown key.*allowed: name, k"):
        compose([*overrides, "drafter.kk=1"])
    with pytest.raises(Exception, match=r"drafter\.k: must be >= 1"):
        validate(compose([*overrides, "drafter.k=0"]))
    summary = run(compose([*overrides, "draft_length=4"]), output_dir=str(plugin / "run"))
    assert summary["status"] == "FINISHED" and summary["lossless_rate"] == 1.0
    assert summary["drafted_tokens"] > 0 and summary["mean_draft_length"] <= 4
    recorded = json.loads((plugin / "run" / "summary.json").read_text())
    assert recorded["status"] == "FINISHED" and "acceptance_rate" in recorded

