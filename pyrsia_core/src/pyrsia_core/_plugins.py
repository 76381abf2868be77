"""Plugin discovery through ``importlib.metadata`` entry points (DESIGN §3, STYLE §4).

Each group maps a name to a factory ``(config: Mapping[str, str]) -> instance``.
Plugins are imported lazily: listing names reads metadata only; the plugin's
module is imported when :func:`load` is called for that name.

``importlib.metadata`` is imported inside the functions: it pulls in modules
(``email``, ``socket``) that the pure core must not load at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

import attrs

from .errors import PluginConflict, PluginError, PluginNotFound

__all__ = [
    "GROUPS",
    "PluginSpec",
    "available",
    "block",
    "create",
    "load",
    "registered",
]

GROUPS: Final = (
    "pyrsia.blob_store",
    "pyrsia.kv_store",
    "pyrsia.transport",
    "pyrsia.package_type",
    "pyrsia.upstream",
)


@attrs.frozen
class PluginSpec:
    """One plugin found through its entry point: group, name, target and distribution."""

    group: str
    name: str
    value: str  # "module:attr" -- not imported yet
    dist: str  # "name version"
    _loaded: Callable[..., Any] | None = attrs.field(default=None, eq=False, repr=False)

    def load(self) -> Callable[..., Any]:
        if self._loaded is not None:
            return self._loaded
        from importlib import import_module

        module_name, _, attr = self.value.partition(":")
        try:
            obj: Any = import_module(module_name.strip())
            for part in filter(None, attr.strip().split(".")):
                obj = getattr(obj, part)
        except Exception as exc:
            raise PluginError(
                f"plugin {self.name!r} ({self.group}) from {self.dist} failed to load "
                f"{self.value!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if not callable(obj):
            raise PluginError(f"plugin {self.name!r} ({self.group}) {self.value!r} is not callable")
        return obj  # type: ignore[no-any-return]


_registered: dict[tuple[str, str], PluginSpec] = {}
_blocked: set[tuple[str, str]] = set()


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise PluginError(f"unknown plugin group {group!r}; groups are {', '.join(GROUPS)}")


def _discover(group: str) -> dict[str, list[PluginSpec]]:
    # Walk the distributions ourselves: ``entry_points(group=...)`` keeps only one
    # entry per name on some Python versions, which would hide a conflict.
    from importlib.metadata import distributions

    found: dict[str, list[PluginSpec]] = {}
    seen: set[tuple[str, str, str]] = set()
    for dist in distributions():
        dist_name = dist.metadata["Name"] or "<unknown distribution>"
        for ep in dist.entry_points:
            if ep.group != group:
                continue
            # The same distribution can be seen twice (on two sys.path entries);
            # that is one registration, not a conflict.
            key = (ep.name, ep.value, dist_name.lower().replace("_", "-"))
            if key in seen:
                continue
            seen.add(key)
            found.setdefault(ep.name, []).append(
                PluginSpec(group, ep.name, ep.value, f"{dist_name} {dist.version}")
            )
    return found


def available(group: str) -> dict[str, PluginSpec]:
    """Installed (and test-registered) plugins of ``group``, by name. Imports nothing."""
    _check_group(group)
    out: dict[str, PluginSpec] = {}
    for name, specs in _discover(group).items():
        if (group, name) in _blocked:
            continue
        dists = {s.dist for s in specs}
        if len(specs) > 1 and len(dists) > 1:
            raise PluginConflict(
                f"plugin name {name!r} in group {group} is registered by more than one "
                f"distribution: {' and '.join(sorted(dists))}; uninstall one of them"
            )
        out[name] = specs[0]
    for (g, name), spec in _registered.items():
        if g == group:
            out[name] = spec
    return out


def load(group: str, name: str) -> Callable[..., Any]:
    """Import and return the factory registered as ``name`` in ``group``."""
    plugins = available(group)
    spec = plugins.get(name)
    if spec is None:
        names = ", ".join(sorted(plugins)) or "none"
        raise PluginNotFound(
            f"no {group} plugin named {name!r}: misspelled or not installed (installed: {names})"
        )
    return spec.load()


def create(group: str, name: str, config: Mapping[str, str] | None = None) -> Any:
    """Load the factory and call it with ``config``."""
    factory = load(group, name)
    return factory(dict(config or {}))


@contextmanager
def registered(group: str, name: str, factory: Callable[..., Any]) -> Iterator[None]:
    """Register a factory directly, for tests (like hypothesis' ``with_register_backend``)."""
    _check_group(group)
    key = (group, name)
    previous = _registered.get(key)
    _registered[key] = PluginSpec(group, name, "<registered>", "<test registration>", factory)
    try:
        yield
    finally:
        if previous is None:
            del _registered[key]
        else:
            _registered[key] = previous


@contextmanager
def block(group: str, name: str) -> Iterator[None]:
    """Hide an installed plugin (a deny-list, like pluggy's ``set_blocked``)."""
    _check_group(group)
    key = (group, name)
    added = key not in _blocked
    _blocked.add(key)
    try:
        yield
    finally:
        if added:
            _blocked.discard(key)
