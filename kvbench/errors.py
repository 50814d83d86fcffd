"""Errors that kvbench reports to the user as one line (exit code 2), never as a traceback."""


class KvbenchError(Exception):
    """Base class: anything the CLI turns into a one-line message and exit code 2."""


class InputError(KvbenchError):
    """Bad user input: unknown names, malformed values, broken data files."""


class ModelUnavailableError(KvbenchError):
    """Weights are not on this machine and cannot be fetched."""
