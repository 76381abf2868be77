"""A headless Chromium driven by selenium, offline: Debian's ``chromium`` and
``chromium-driver`` (never a Selenium Manager download), every host name but 127.0.0.1
unresolvable (no DNS lookup leaves the machine)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["CHROMEDRIVER", "artifacts_dir", "chromium", "console_errors", "phone_width"]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[2]


def artifacts_dir() -> Path:
    """Where tests keep screenshots: ``$PYRSIA_TEST_ARTIFACTS``, else ``test-artifacts/``."""
    path = Path(os.environ.get("PYRSIA_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def chromium(width: int = 1280, height: int = 1000) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--no-first-run", "--disable-sync",
                "--disable-background-networking", "--disable-component-update",
                "--disable-default-apps", "--disable-domain-reliability", "--no-pings",
                "--dns-prefetch-disable", "--disable-features=Translate,OptimizationHints,"
                "MediaRouter,AutofillServerCommunication",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    env = {"SE_AVOID_STATS": "true", "SE_OFFLINE": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The browser console's errors since the last call (``SEVERE`` entries)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def phone_width(driver: Any, width: int = 390, height: int = 844) -> None:
    """Render as a phone of ``width`` x ``height`` CSS pixels (device emulation)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": True})
