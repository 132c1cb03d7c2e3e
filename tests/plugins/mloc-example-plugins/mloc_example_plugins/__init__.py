"""Example MLOC plug-ins, found by MLOC through the ``mloc.executors`` entry points in pyproject.toml."""
