"""Metrics. Importing this package registers every built-in metric in `bench.core.registry.METRICS`."""

from metrics import ground_truth  # noqa: F401
from metrics import digits  # noqa: F401
from metrics import perceptual  # noqa: F401
