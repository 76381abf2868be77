"""Public face of plugin discovery (see :mod:`pyrsia_core._plugins`)."""

from ._plugins import GROUPS, PluginSpec, available, block, create, load, registered

__all__ = ["GROUPS", "PluginSpec", "available", "block", "create", "load", "registered"]
