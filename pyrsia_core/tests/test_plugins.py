"""Entry-point plugin discovery: lazy, explicit, conflicts and unknown names are errors."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from pyrsia_core.errors import PluginConflict, PluginError, PluginNotFound, UsageError
from pyrsia_core.testing import MemoryKeyValueStore

from pyrsia_core import plugins


def test_core_registers_memory_stores() -> None:
    assert "memory" in plugins.available("pyrsia.kv_store")
    store = plugins.create("pyrsia.kv_store", "memory", {})
    assert isinstance(store, MemoryKeyValueStore)


def test_unknown_name_lists_installed_names() -> None:
    with pytest.raises(PluginNotFound) as info:
        plugins.load("pyrsia.kv_store", "levledb")
    assert "levledb" in str(info.value) and "memory" in str(info.value)
    assert isinstance(info.value, UsageError)


def test_unknown_group() -> None:
    with pytest.raises(PluginError):
        plugins.available("pyrsia.nope")


def test_registered_and_blocked() -> None:
    with plugins.registered("pyrsia.transport", "fake", lambda cfg: ("fake", cfg)):
        assert plugins.create("pyrsia.transport", "fake", {"a": "b"}) == ("fake", {"a": "b"})
    assert "fake" not in plugins.available("pyrsia.transport")
    with plugins.block("pyrsia.kv_store", "memory"):
        assert "memory" not in plugins.available("pyrsia.kv_store")
    assert "memory" in plugins.available("pyrsia.kv_store")


def _fake_dist(root: Path, name: str, version: str, entry: str, module: str) -> None:
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[pyrsia.upstream]\n{entry} = {module}:factory\n")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for mod in [m for m in sys.modules if m.startswith("fakeplug")]:
            del sys.modules[mod]


def test_plugins_are_imported_lazily(site: Path) -> None:
    (site / "fakeplug_lazy.py").write_text("IMPORTED = True\ndef factory(cfg):\n    return cfg\n")
    _fake_dist(site, "fake-lazy", "1.0", "lazy", "fakeplug_lazy")
    assert "lazy" in plugins.available("pyrsia.upstream")
    assert "fakeplug_lazy" not in sys.modules  # listing imports nothing
    assert plugins.create("pyrsia.upstream", "lazy", {"x": "1"}) == {"x": "1"}
    assert "fakeplug_lazy" in sys.modules


def test_two_distributions_claiming_one_name(site: Path) -> None:
    _fake_dist(site, "fake-one", "1.0", "clash", "fakeplug_a")
    _fake_dist(site, "fake-two", "2.0", "clash", "fakeplug_b")
    with pytest.raises(PluginConflict) as info:
        plugins.load("pyrsia.upstream", "clash")
    assert "fake-one 1.0" in str(info.value) and "fake-two 2.0" in str(info.value)


def test_a_plugin_that_fails_to_import_is_named(site: Path) -> None:
    (site / "fakeplug_broken.py").write_text("raise RuntimeError('boom')\n")
    _fake_dist(site, "fake-broken", "0.1", "broken", "fakeplug_broken")
    with pytest.raises(PluginError) as info:
        plugins.load("pyrsia.upstream", "broken")
    assert "fake-broken 0.1" in str(info.value) and "boom" in str(info.value)


def test_metadata_sees_fake_dists(site: Path) -> None:
    _fake_dist(site, "fake-seen", "1.0", "seen", "fakeplug_seen")
    names = {ep.name for ep in metadata.entry_points(group="pyrsia.upstream")}
    assert "seen" in names
