"""Headless Chromium for the UI tests (report page, chat app), driven through Selenium.

Uses Debian's `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver); a test
that needs them skips with the reason when either (or the `selenium` package) is absent. Nothing is
downloaded: the driver path is given explicitly, so Selenium Manager never runs, and Chromium is
started with its background networking off. Screenshots go to <repo>/test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("RLHFKIT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RLHFKIT_CHROMEDRIVER", "/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--metrics-recording-only",
    "--mute-audio",
    "--no-default-browser-check",
    "--hide-scrollbars",
)


def require_chromium() -> None:
    """Skip the calling test, saying why, when headless Chromium cannot be driven here."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not found: install Debian's browser with "
            "`apt-get install -y chromium chromium-driver` to run the browser tests"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("the `selenium` package is not installed (pip install selenium)")


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 1000, page_load_timeout: float = 30) -> Iterator:
    """A headless Chromium WebDriver with a throw-away profile; quit (browser and driver) on exit."""
    require_chromium()
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager: never look anything up online
    os.environ.setdefault("SE_AVOID_STATS", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="rlhfkit-chromium-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={width},{height}")
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        driver.set_page_load_timeout(page_load_timeout)
        yield driver
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(predicate: Callable[[], object], timeout: float = 30, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # a stale element while the page re-renders: try again
            last_exc = exc
        time.sleep(interval)
    pytest.fail(
        f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else "")
    )


def screenshot(driver, name: str, full_page: bool = False, max_height: int = 12000) -> Path:
    """Save a PNG of the page to test-artifacts/NAME and check it is a real, non-empty PNG."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    if full_page:
        size = driver.get_window_size()
        h = driver.execute_script("return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
        driver.set_window_size(size["width"], min(max(int(h) + 120, size["height"]), max_height))
    data = driver.get_screenshot_as_png()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, f"screenshot {name} is not a PNG"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
