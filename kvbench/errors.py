"""Errors that kvbench reports to the user as one line (exit code 2), never as a traceback."""

from __future__ import annotations

from collections.abc import Callable


class KvbenchError(Exception):
    """Base class: anything the CLI turns into a one-line message and exit code 2."""

    def phrased(self, spell: Callable[[str], str]) -> str:
        """The message with option names spelled by a front end (see InputError)."""
        return str(self)


class InputError(KvbenchError):
    """Bad user input: unknown names, malformed values, broken data files.

    An error about run options names them in its message as `{field}` placeholders, `field` being a field of
    `runner.RunOptions`, and lists them in `options`. Each front end spells them its own way: the CLI as flags
    (`--ratio`), the Python API as arguments (`ratios=`, also what str() gives). Only the listed placeholders
    are replaced, so braces in user values are left alone."""

    def __init__(self, message: str, *, options: tuple[str, ...] = ()):
        super().__init__(message)
        self.template = message
        self.options = options

    def phrased(self, spell: Callable[[str], str]) -> str:
        text = self.template
        for name in self.options:
            text = text.replace("{" + name + "}", spell(name))
        return text

    def __str__(self) -> str:
        return self.phrased(argument_name)


def argument_name(field: str) -> str:
    """How the Python API names an option in messages: `ratios=`."""
    return f"{field}="


class ModelUnavailableError(KvbenchError):
    """Weights are not on this machine and cannot be fetched."""
