"""The HTTP side of `samcache serve`: a FastAPI app over a ServeSession (session.py).

    GET  /api/images    every image of the cache: name, split, width, height, objects, categories
    POST /api/predict   {"image", "model", "box", "points"} -> {"segmentation" (COCO RLE), "score", ...}

A refused request is a JSON `{"error": message}` with a 4xx status, and changes nothing.
"""

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from samcache.serve.session import RequestError, ServeSession


def create_app(session: ServeSession) -> FastAPI:
    """The FastAPI application serving `session` (imported only by `samcache serve`: FastAPI is the
    optional `serve` extra)."""
    app = FastAPI(title="samcache serve", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.get("/api/images")
    def images() -> dict:
        return {"images": session.images(), "models": list(session.decoders)}

    @app.post("/api/predict")
    async def predict(request: Request):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not JSON ({exc})") from None
        # The decoder pass runs in a worker thread: the event loop keeps answering meanwhile.
        return await run_in_threadpool(session.predict, body)

    return app
