"""One-line error messages: what the app shows for an exception."""
from __future__ import annotations


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most `limit` characters), else its class name."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else e.__class__.__name__
