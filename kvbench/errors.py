"""Errors that kvbench reports to the user as one line (exit code 2), never as a traceback.

An error about options names them in its message as `{field}` placeholders, `field` being the option's name
in Python (a field of `runner.RunOptions`, or a keyword of `kvbench.table`), and lists them in `options`.
Each front end spells them its own way: the CLI as flags (`--ratio`), the Python API as arguments (`ratios=`,
which is also what str() gives). Only the listed placeholders are replaced, so braces in user values are left
alone."""

from __future__ import annotations

from collections.abc import Callable


def argument_name(field: str) -> str:
    """How the Python API names an option in messages: `ratios=`."""
    return f"{field}="


class KvbenchError(Exception):
    """Base class: anything the CLI turns into a one-line message and exit code 2."""

    def __init__(self, message: str = "", *, options: tuple[str, ...] = ()):
        super().__init__(message)
        self.template = message
        self.options = options

    def phrased(self, spell: Callable[[str], str]) -> str:
        """The message with each listed option spelled by `spell` (the CLI passes its flag names)."""
        text = self.template
        for name in self.options:
            text = text.replace("{" + name + "}", spell(name))
        return text

    def __str__(self) -> str:
        return self.phrased(argument_name)


class InputError(KvbenchError):
    """Bad user input: unknown names, malformed values, broken data files."""


class ModelUnavailableError(KvbenchError):
    """Weights are not on this machine and cannot be fetched."""
