"""Alignment methods, one file each. Importing this package registers every built-in method.

To add a method: write `methods/<name>.py` (see bench/core/method.py and docs/adding_a_method.md)
and import it here.
"""

from methods import draft, sqdf  # noqa: F401
from methods import ddpo  # noqa: F401
from methods import dpok  # noqa: F401
from methods import refl  # noqa: F401
from methods import alignprop  # noqa: F401
from methods import seiko  # noqa: F401
from methods import sqdf_online  # noqa: F401
