"""Tasks. Importing this package registers every built-in task in `bench.core.registry.TASKS`."""

from bench.tasks import gmm  # noqa: F401
from bench.tasks import digits  # noqa: F401
from bench.tasks import sd  # noqa: F401
