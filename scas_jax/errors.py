"""Exceptions shared by every stage."""


class ScasError(Exception):
    """An error caused by the user's input or files; the CLI prints it without a traceback."""
