"""User-facing errors.

A `BenchError` is bad input or a missing resource: the CLI prints its message on one line and exits
with code 2, without a traceback. Its message says what is wrong and what is accepted.
"""

from __future__ import annotations


class BenchError(Exception):
    """Bad input or a missing resource; the CLI prints it as one line and exits 2."""


class UnknownNameError(BenchError, KeyError):
    """A registry lookup for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class MissingWeightsError(BenchError, FileNotFoundError):
    """A model or reward needs a weight file that is not on this machine."""

    def __init__(self, what: str, file: str, how: str) -> None:
        super().__init__(f"{what} needs the weight file {file!r}, which was not found; {how}")

    def __str__(self) -> str:
        return str(self.args[0])
