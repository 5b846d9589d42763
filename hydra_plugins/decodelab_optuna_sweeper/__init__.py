"""A Hydra sweeper on current Optuna (ask/tell), selected with ``hydra/sweeper=decodelab_optuna``.

Lives in the ``hydra_plugins`` namespace package (no ``hydra_plugins/__init__.py``) because Hydra only
instantiates plugins its scan of that package discovered.
"""
