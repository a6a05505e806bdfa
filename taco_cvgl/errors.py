"""Exceptions that carry a message meant for the user, not a stack trace."""


class TacoError(Exception):
    """Base class for every error taco_cvgl reports to a user."""


class InputError(TacoError):
    """An input file or message is missing, unreadable or malformed."""


class MismatchError(TacoError):
    """A model and a database (or two configs) that must agree do not."""


def first_line(exc: BaseException) -> str:
    """Return the first line of an exception's message (its class name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else exc.__class__.__name__
