"""The ``pyrsia`` command-line interface."""

__version__ = "0.1.0"
__all__ = ["__version__"]
