"""The README's picture of `samcache serve`: the demo's cache and fine-tuned run in headless
Chromium, a box dragged around a test page's first stamp, the mask shown beside the ground truth.

    make demo && .venv/bin/python scripts/serve_screenshot.py docs/serve.png
"""

from __future__ import annotations

import sys
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.browser import drag_on_canvas, new_chrome, open_page, running_server, screenshot, wait_for  # noqa: E402


def main(out: Path, cache: Path = REPO / "cache/stamps", run: Path = REPO / "runs/stamps") -> None:
    import json
    import urllib.request

    from samcache.serve.app import create_app
    from samcache.serve.session import ServeSession

    with running_server(create_app(ServeSession(cache, run))) as url:
        images = json.loads(urllib.request.urlopen(url + "/api/images").read())["images"]
        image = next(im for im in images if im["split"] == "test" and im["objects"] >= 2)
        truth = json.loads(urllib.request.urlopen(url + "/api/objects?image=" + urllib.parse.quote(image["name"])).read())
        chrome = new_chrome()
        try:
            open_page(chrome, url + "/")
            wait_for(chrome, "#status[data-state='ready']")
            chrome.find_element("css selector", f"#images li[data-name='{image['name']}']").click()
            wait_for(chrome, f"#view[data-image='{image['name']}']")
            wait_for(chrome, "#status[data-state='ready']")
            width = chrome.execute_script("return document.getElementById('view').width;")
            scale = width / image["width"]
            x, y, w, h = truth["objects"][0]["bbox"]
            drag_on_canvas(chrome, "#view", (x * scale - 5, y * scale - 5), ((x + w) * scale + 5, (y + h) * scale + 5))
            wait_for(chrome, "#status[data-state='predicted']", timeout=60)
            screenshot(chrome, out)
        finally:
            chrome.quit()
    print(f"wrote {out} ({image['name']})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs/serve.png")
