"""Browser tests' helpers: headless system Chromium driven by Selenium, and a live uvicorn server for
an ASGI app. A test module makes the fixtures visible to pytest (`chrome = browser.chrome`,
`live_server = browser.live_server`, as tests/test_browser_harness.py does) and marks its tests
`@pytest.mark.browser`: `make test` leaves them out, `make test-all` runs them after `make browser`
installed Chromium and chromedriver.

Nothing here downloads anything: the driver and the browser are the ones on PATH, never Selenium
Manager's."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import uvicorn
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

WINDOW_SIZE = (1280, 900)
# An app's open event streams (server-sent events) never end by themselves: the server stops
# waiting for them after this many seconds.
SERVER_GRACE_S = 2
SERVER_START_TIMEOUT_S = 10
# How often wait_for() and open_page() look again: a page reacts within tens of milliseconds.
POLL_S = 0.05

# Selenium Manager would download a browser or a driver it cannot find; with the driver's path given
# it is not asked, and offline it would fail instead of downloading.
os.environ.setdefault("SE_OFFLINE", "true")


def find_browser() -> tuple[str, str]:
    """The system Chromium and chromedriver, as (browser path, driver path). Fails the calling test
    with one line saying to run `make browser` when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = " and ".join(name for name, path in (("chromium", browser), ("chromedriver", driver)) if path is None)
        pytest.fail(f"{missing} not found on PATH: run `make browser` (as root) first", pytrace=False)
    return browser, driver


def new_chrome(window_size: tuple[int, int] = WINDOW_SIZE) -> webdriver.Chrome:
    """A headless Chromium; the caller quits it.

    Arguments:
      window_size (tuple(int, int)): the window's width and height in CSS pixels.
    """
    browser, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
    # --disable-dev-shm-usage: containers' /dev/shm is often too small for Chromium's shared memory.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={window_size[0]},{window_size[1]}")
    # Keeps the page's console messages for console_errors().
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.fixture
def chrome() -> Iterator[webdriver.Chrome]:
    """A headless Chromium (new_chrome()) for one test, quit after it."""
    driver = new_chrome()
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: webdriver.Chrome, url: str, timeout: float = 10) -> None:
    """Loads url and waits until its document and scripts have loaded.

    Arguments:
      driver (webdriver.Chrome): the browser.
      url (str): the page.
      timeout (float): seconds to wait for the load.
    """
    driver.get(url)
    try:
        WebDriverWait(driver, timeout, poll_frequency=POLL_S).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )
    except TimeoutException:
        raise AssertionError(f"{url} did not finish loading in {timeout} s") from None


def wait_for(driver: webdriver.Chrome, css_selector: str, timeout: float = 10, visible: bool = True) -> WebElement:
    """The first element matching css_selector, once there is one (and it is visible, unless
    visible is False). Raises AssertionError naming the selector and the page after timeout.

    Arguments:
      driver (webdriver.Chrome): the browser.
      css_selector (str): what to wait for, e.g. "#status[data-count='1']".
      timeout (float): seconds to wait.
      visible (bool): wait for a displayed element, not only one in the document.
    """
    condition = (
        expected_conditions.visibility_of_element_located
        if visible
        else expected_conditions.presence_of_element_located
    )
    try:
        return WebDriverWait(driver, timeout, poll_frequency=POLL_S).until(condition(("css selector", css_selector)))
    except TimeoutException:
        state = "visible element" if visible else "element"
        raise AssertionError(f"no {state} matches {css_selector!r} on {driver.current_url} after {timeout} s") from None


def _as_element(driver: webdriver.Chrome, canvas: WebElement | str) -> WebElement:
    return wait_for(driver, canvas) if isinstance(canvas, str) else canvas


def _offset_from_center(driver: webdriver.Chrome, canvas: WebElement, point: tuple[float, float]) -> tuple[int, int]:
    """The offset of canvas pixel `point` from the element's center, in CSS pixels, as WebDriver's
    element-relative pointer moves count it (from the floored center of the element's box)."""
    return tuple(
        driver.execute_script(
            """
            const [c, x, y] = arguments;
            const r = c.getBoundingClientRect();
            const px = r.left + c.clientLeft + x * c.clientWidth / c.width;
            const py = r.top + c.clientTop + y * c.clientHeight / c.height;
            return [Math.round(px - Math.floor((r.left + r.right) / 2)),
                    Math.round(py - Math.floor((r.top + r.bottom) / 2))];
            """,
            canvas,
            point[0],
            point[1],
        )
    )


def drag_on_canvas(
    driver: webdriver.Chrome,
    canvas: WebElement | str,
    start: tuple[float, float],
    end: tuple[float, float],
    steps: int = 5,
) -> None:
    """Presses the mouse at start, moves to end in `steps` moves and releases it: real mouse
    events (mousedown, mousemove..., mouseup) through WebDriver's actions.

    Arguments:
      driver (webdriver.Chrome): the browser.
      canvas (WebElement or str): the <canvas>, or a CSS selector for it.
      start (tuple(float, float)): x, y in canvas pixels (the canvas's width/height attributes, not
        its size on the page). Assumes the canvas has no padding; borders are accounted for.
      end (tuple(float, float)): x, y in canvas pixels.
      steps (int): pointer moves between press and release (apps that draw on mousemove see them).
    """
    element = _as_element(driver, canvas)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", element)
    x0, y0 = _offset_from_center(driver, element, start)
    x1, y1 = _offset_from_center(driver, element, end)
    actions = ActionChains(driver).move_to_element_with_offset(element, x0, y0).click_and_hold()
    done_x = done_y = 0
    for step in range(1, steps + 1):
        # Whole pixels per move that add up exactly to the whole drag.
        to_x, to_y = (x1 - x0) * step // steps, (y1 - y0) * step // steps
        actions.move_by_offset(to_x - done_x, to_y - done_y)
        done_x, done_y = to_x, to_y
    actions.release().perform()


def screenshot(driver: webdriver.Chrome, path: str | Path) -> Path:
    """Saves the window as a PNG at path (its folder is made) and returns the path.

    Arguments:
      driver (webdriver.Chrome): the browser.
      path (str or Path): where to write the PNG.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise AssertionError(f"the browser could not write a screenshot to {path}")
    return path


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """The page's console errors (uncaught exceptions, failed requests) since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


@contextmanager
def running_server(app, host: str = "127.0.0.1") -> Iterator[str]:
    """Serves the ASGI app with uvicorn in a background thread on a free port of host; yields its
    base URL (no trailing slash) once it accepts requests, and stops it on exit.

    Arguments:
      app: the ASGI application (a FastAPI or Starlette object).
      host (str): the address to listen on.
    """
    # The socket is bound here, so the port is ours before the server starts: no race with another
    # process for a port picked as free.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=SERVER_GRACE_S, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive():
                raise AssertionError(f"uvicorn stopped while starting {app!r} (its log is in the captured stderr)")
            if time.monotonic() > deadline:
                raise AssertionError(f"uvicorn did not start {app!r} in {SERVER_START_TIMEOUT_S} s")
            time.sleep(0.02)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(SERVER_START_TIMEOUT_S + SERVER_GRACE_S)
        sock.close()
        if thread.is_alive():
            raise AssertionError(f"uvicorn serving {app!r} did not stop")


@pytest.fixture
def live_server() -> Iterator:
    """A factory: live_server(app, host="127.0.0.1") serves the ASGI app (running_server()) until
    the test ends and returns its base URL. Request it before `chrome` in a test's arguments, so
    the browser quits (and closes its event streams) before the server stops."""
    with ExitStack() as servers:
        yield lambda app, host="127.0.0.1": servers.enter_context(running_server(app, host))
