"""Command line: ``decodelab run|sweep|list|upload|report|reproduce|simulate``.

``run`` is a Hydra app (standard override grammar, ``-m`` for multirun, ``--cfg job`` ...). Before Hydra
starts, every job's overrides are composed and validated here, so bad input fails in one line with exit
code 2 before any model is loaded or any run is recorded.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from decodelab.errors import UserError

USAGE = """usage: decodelab COMMAND [args]

commands:
  run [overrides] [-m]   run one composition (or a Hydra multirun with -m); e.g. decodelab run experiment=quickstart
  sweep NAME [overrides]  run a named sweep or search from sweeps/ (e.g. decodelab sweep drafters task.limit=2)
  list                   print every config group and its options
  upload RUN_DIR [overrides]   log a finished local run folder to the configured trackers (tracking=...)
  report SWEEP           write Markdown/HTML tables and PNG plots for a sweep folder or MLflow parent run id
  reproduce RUN          re-run a run folder or MLflow run id from its logged config and compare
  simulate RUN_DIR       estimate acceptance of model-free drafters from a run's recorded greedy outputs
  train-drafter [overrides]  train an EAGLE (train=eagle) or Medusa (train=medusa) head on the target's own answers
"""

# One module per command; each has ``cli(args: List[str]) -> None``.
DELEGATED = {"run": "decodelab.cli.run", "sweep": "decodelab.cli.sweep", "list": "decodelab.cli.list",
             "upload": "decodelab.cli.upload", "report": "decodelab.cli.report",
             "reproduce": "decodelab.cli.reproduce", "simulate": "decodelab.cli.simulate",
             "train-drafter": "decodelab.cli.train"}




def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    try:
        if command in DELEGATED:
            import importlib

            importlib.import_module(DELEGATED[command]).cli(rest)
        else:
            raise UserError(f"unknown command {command!r}; allowed: {', '.join(DELEGATED)}")
    except UserError as err:
        fail(str(err))


def fail(message: str) -> None:
    print(f"decodelab: error: {message}", file=sys.stderr)
    sys.exit(2)



if __name__ == "__main__":
    main()
