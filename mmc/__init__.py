"""mmc: scaling laws of multi-model collaboration and model merging, measured end to end."""

__version__ = "0.1.0"


class MMCError(Exception):
    """A problem with the user's input: the CLI prints it as one line, without a traceback."""
