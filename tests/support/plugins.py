"""Installing a plugin distribution for a test module, and removing it afterwards."""

from __future__ import annotations

import importlib
import importlib.util
import site
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyrsia_core import plugins


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True, capture_output=True, timeout=120)


@contextmanager
def installed(dist_dir: Path, dist: str, module: str, name: str,
              group: str = "pyrsia.package_type") -> Iterator[None]:
    """Install ``dist_dir`` (editable) into this interpreter; uninstall it afterwards.

    A fresh interpreter would read the editable install's ``.pth`` file at start;
    ``site.addsitedir`` does the same for this one, so its module can be imported.
    """
    # Build with the hatchling at hand (no download) when there is one.
    offline = ["--no-build-isolation"] if importlib.util.find_spec("hatchling") else []
    _pip("install", "--no-deps", *offline, "-e", str(dist_dir))
    path_before = list(sys.path)
    try:
        site.addsitedir(sysconfig.get_paths()["purelib"])
        importlib.invalidate_caches()
        yield
    finally:
        _pip("uninstall", "-y", dist)
        sys.path[:] = path_before
        sys.modules.pop(module, None)
        importlib.invalidate_caches()
        assert name not in plugins.available(group)
