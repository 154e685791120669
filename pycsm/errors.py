"""Exceptions raised by pycsm."""


class CSMError(RuntimeError):
    """A failure reported by pycsm's native library (the message is the C error text)."""
