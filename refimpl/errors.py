"""The one exception type for user errors (bad file, bad config, bad tokens).

Its message is a sentence naming the file or field and what is wrong; the command lines print it
on one line and exit with code 2. Assertions are kept for our own invariants.
"""


class RefimplError(Exception):
    """A user error: the message names the file or field and the problem."""


class ConfigError(RefimplError):
    """A config.json whose fields are missing, of the wrong type, or don't fit together."""


class CheckpointError(RefimplError):
    """A checkpoint file that is unreadable, inconsistent with its config, or holds bad values."""


class InputError(RefimplError):
    """Model inputs that are out of range or of the wrong dtype or rank."""
