"""Task sources by discovery: a module of this package that defines ``SOURCE`` (the ``task.source`` value)
and ``load(cfg: TaskConfig) -> List[Prompt]`` is a task; a new task is one module and one conf/task YAML."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict, List

import decodelab.tasks as tasks_package
from decodelab.config import TaskConfig
from decodelab.tasks.base import Prompt

Loader = Callable[[TaskConfig], List[Prompt]]


def _discover() -> Dict[str, Loader]:
    found: Dict[str, Loader] = {}
    for module_info in pkgutil.iter_modules(tasks_package.__path__):
        if module_info.name == "registry":
            continue
        module = importlib.import_module(f"{tasks_package.__name__}.{module_info.name}")
        source, load = getattr(module, "SOURCE", None), getattr(module, "load", None)
        if isinstance(source, str) and callable(load):
            found[source] = load
    return dict(sorted(found.items()))


SOURCES: Dict[str, Loader] = _discover()
