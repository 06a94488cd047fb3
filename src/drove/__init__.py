"""drove: replicated block storage for containers."""

__version__ = "0.1.0"
