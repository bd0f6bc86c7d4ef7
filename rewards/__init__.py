"""Reward models. Importing this package registers every built-in reward in `bench.registry.REWARDS`."""

from rewards import gmm  # noqa: F401
