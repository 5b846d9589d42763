"""Running one composition in this process and reading back its run folder (the engine tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence, Tuple

from decodelab.experiment.compose import compose
from decodelab.experiment.runner import run


def decode(tmp_path: Path, base: Sequence[str], *overrides: str) -> Tuple[dict, List[dict]]:
    """(summary, samples) of ``decodelab run`` with ``base`` and ``overrides``, in a folder named after them."""
    out = tmp_path / "_".join(o.replace("=", "-").replace("/", "") for o in overrides)[:80]
    summary = run(compose([*base, *overrides, f"output_dir={out}"]))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return summary, samples
