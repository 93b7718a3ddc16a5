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


def printable(text) -> str:
    """`text` safe to print on one line: control, format and line/paragraph-separator characters
    (which could end a line, move the cursor or reorder text, and so forge output) are shown as
    Python escapes (\\n, \\x1b, \\u202e).  Used on everything that came from a file or a user
    before it is printed."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else _escape(c) for c in text)


def _escape(c: str) -> str:
    r = repr(c)[1:-1]
    if r != c and r.startswith("\\"):
        return r
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"
