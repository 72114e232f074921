"""Errors that are the user's to fix: the CLI prints them without a traceback and exits 1."""


class UserError(Exception):
    """A mistake in input (a path, an argument, a checkpoint) explained in one message."""
