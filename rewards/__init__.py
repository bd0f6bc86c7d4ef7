"""Reward models. Importing this package registers every built-in reward in `bench.core.registry.REWARDS`."""

from rewards import gmm  # noqa: F401
from rewards import digits  # noqa: F401
from rewards import aesthetic, clip_score, hps, imagereward, pickscore  # noqa: F401
