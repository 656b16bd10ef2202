"""The browser harness end to end (tests/browser.py): a page served by uvicorn, drawn on with real
mouse events in headless Chromium, its drawing posted back as JSON and acknowledged over server-sent
events, the way `samcache serve`'s page talks to its server."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel

from tests import browser
from tests.browser import console_errors, drag_on_canvas, open_page, screenshot, wait_for

# The harness's fixtures, made visible to pytest in this module.
chrome = browser.chrome
live_server = browser.live_server

pytestmark = pytest.mark.browser

# A canvas drawn larger than its pixels (400x300 shown at 600x450, with a border), so the test
# also checks drag_on_canvas's conversion from canvas pixels to the page's.
PAGE = """<!doctype html>
<html><head><link rel="icon" href="data:,"></head>
<body style="margin: 30px">
<canvas id="board" width="400" height="300"
        style="width: 600px; height: 450px; border: 3px solid black"></canvas>
<p id="status" data-count="0">no rectangle</p>
<script>
const board = document.getElementById("board");
const ctx = board.getContext("2d");
let start = null;
function pixel(event) {
  const r = board.getBoundingClientRect();
  return [(event.clientX - r.left - board.clientLeft) * board.width / board.clientWidth,
          (event.clientY - r.top - board.clientTop) * board.height / board.clientHeight];
}
board.addEventListener("mousedown", (event) => { start = pixel(event); });
board.addEventListener("mouseup", (event) => {
  const [x0, y0] = start, [x1, y1] = pixel(event);
  ctx.strokeStyle = "red";
  ctx.lineWidth = 2;
  ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  fetch("/rects", {method: "POST", headers: {"Content-Type": "application/json"},
                   body: JSON.stringify({x0, y0, x1, y1})});
});
new EventSource("/events").onmessage = (event) => {
  const status = document.getElementById("status");
  status.dataset.count = JSON.parse(event.data).count;
  status.textContent = status.dataset.count + " rectangle(s) saved";
};
</script>
</body></html>
"""


class Rect(BaseModel):
    x0: float
    y0: float
    x1: float
    y1: float


def rect_app(received: list[Rect]) -> FastAPI:
    """The page above, an endpoint that appends each posted rectangle to received, and an event
    stream that sends the count of rectangles whenever it changes."""
    app = FastAPI()

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.post("/rects")
    def add_rect(rect: Rect) -> dict:
        received.append(rect)
        return {"count": len(received)}

    @app.get("/events")
    async def events() -> StreamingResponse:
        async def stream():
            sent = None
            while True:
                if len(received) != sent:
                    sent = len(received)
                    yield f"data: {json.dumps({'count': sent})}\n\n"
                await asyncio.sleep(0.05)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def test_a_rectangle_drawn_with_the_mouse_reaches_the_server(live_server, chrome, tmp_path):
    received: list[Rect] = []
    url = live_server(rect_app(received))
    open_page(chrome, url + "/")
    wait_for(chrome, "#status[data-count='0']")

    drag_on_canvas(chrome, "#board", (60, 45), (310, 220))

    # The count arrives over the event stream only after the server stored the rectangle.
    wait_for(chrome, "#status[data-count='1']")
    assert len(received) == 1
    rect = received[0]
    assert rect.x0 == pytest.approx(60, abs=1) and rect.y0 == pytest.approx(45, abs=1)
    assert rect.x1 == pytest.approx(310, abs=1) and rect.y1 == pytest.approx(220, abs=1)
    assert console_errors(chrome) == []

    png = screenshot(chrome, tmp_path / "shots" / "rect.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1000
