"""Tasks. Importing this package registers every built-in task in `bench.registry.TASKS`."""

from bench.tasks import gmm  # noqa: F401
