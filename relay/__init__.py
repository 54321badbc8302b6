"""relay: a durable webhook relay daemon."""

__version__ = "0.1.0"
