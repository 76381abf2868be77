"""``pyrsia --version``: the CLI's version, then every installed pyrsia distribution's."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

__all__ = ["VersionAction", "versions_text"]


def versions_text() -> str:
    from . import __version__

    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name == "pyrsia" or name.startswith("pyrsia-"):
            found.setdefault(name, dist.version)
    lines = [f"pyrsia {__version__}"]
    lines += [f"  {name} {version}" for name, version in sorted(found.items())]
    return "\n".join(lines)


class VersionAction(argparse.Action):
    """Like argparse's ``version`` action, but the text is made only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the versions of the CLI and of every installed "
                          "pyrsia distribution (core, node, plugins), then exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        sys.stdout.write(versions_text() + "\n")
        parser.exit()
