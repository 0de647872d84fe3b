"""Errors that carry a one-line message fit to show a user as it is."""


class SdlabError(Exception):
    """Base of every error sdlab raises on bad input; `str(err)` is one line saying what to do."""


class SdlabWarning(UserWarning):
    """Something the user should know about that does not stop the work (e.g. LoRA keys that match no layer)."""


class CheckpointError(SdlabError):
    """A weights file or folder that is missing, unreadable, unsafe or of another architecture."""


def shorten(items, limit: int = 5) -> str:
    """`a, b, c, … (+N more)` — lists of keys stay on one readable line."""
    items = list(items)
    head = ", ".join(str(i) for i in items[:limit])
    return head + (f", … (+{len(items) - limit} more)" if len(items) > limit else "")
