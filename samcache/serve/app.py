"""The HTTP side of `samcache serve`: a FastAPI app over a ServeSession (session.py).

    GET    /                        the page (static/index.html): draw a box or click points, save the mask
    GET    /static/FILE             the page's script and style (only the files of samcache/serve/static)
    GET    /api/preview?image=NAME  the image's preview JPEG from the cache (longest side PREVIEW_SIZE)
    GET    /api/images              every image of the cache: name, split, width, height, objects, categories
    POST   /api/predict             {"image", "model", "box", "points"} -> {"segmentation" (COCO RLE), "score", ...}
    GET    /api/objects?image=NAME  the image's objects in the dataset, and the annotations' version
    POST   /api/objects             {"image", "version", "segmentation", "category"}: a new object
    PATCH  /api/objects/ID          {"image", "version", "segmentation" and/or "category"}: a corrected object
    DELETE /api/objects/ID?image=NAME&version=V
    POST   /api/finetune            {"epochs" (optional), "split": "val" | "test"} -> 202 {"run": NAME} (finetune.py)
    GET    /api/finetune            the fine-tune's status: phase, epoch, step, loss, val_miou, eval table
    GET    /api/finetune/events     the same status as server-sent events, one per change, until it ends
    POST   /api/finetune/cancel     stops it (the new run keeps last.pt, resumable)

A refused request is a JSON `{"error": message}` with a 4xx status (409: the annotations changed
since they were loaded, or a fine-tune is running already), and changes nothing.
"""

import asyncio
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from samcache.cache.reader import DamagedImageError
from samcache.errors import OutputError
from samcache.serve.corrections import CorrectionError
from samcache.serve.finetune import ENDED, FineTune
from samcache.serve.session import RequestError, ServeSession

STATIC = Path(__file__).parent / "static"
# How often the event stream looks at the fine-tune's status.
EVENTS_POLL_S = 0.5


def create_app(session: ServeSession) -> FastAPI:
    """The FastAPI application serving `session` (imported only by `samcache serve`: FastAPI is the
    optional `serve` extra)."""
    app = FastAPI(title="samcache serve", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestError)
    @app.exception_handler(CorrectionError)
    async def refused(request: Request, exc: RequestError | CorrectionError):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError):  # e.g. an object id that is no integer
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"malformed request ({where})"}, status_code=400)

    @app.exception_handler(OutputError)
    async def not_written(request: Request, exc: OutputError):  # a full disk: the file is as it was
        return JSONResponse({"error": str(exc)}, status_code=500)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    # StaticFiles serves only what lies in STATIC: a path that climbs out of it is a 404.
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/preview")
    def preview(image: str = "") -> Response:
        try:
            jpeg = session.preview(image)
        except DamagedImageError as exc:
            return JSONResponse({"error": str(exc)}, status_code=500)
        return Response(jpeg, media_type="image/jpeg")

    @app.get("/api/images")
    def images() -> dict:
        return {"images": session.images(), "models": list(session.decoders)}

    @app.post("/api/predict")
    async def predict(request: Request):
        # The decoder pass runs in a worker thread: the event loop keeps answering meanwhile.
        return await run_in_threadpool(session.predict, await _json(request))

    @app.get("/api/objects")
    def objects(image: str = "") -> dict:
        return session.objects(image)

    @app.post("/api/objects")
    async def add(request: Request):
        return await run_in_threadpool(session.edit, await _json(request))

    @app.patch("/api/objects/{object_id}")
    async def correct(object_id: int, request: Request):
        return await run_in_threadpool(session.edit, await _json(request), object_id)

    @app.delete("/api/objects/{object_id}")
    def delete(object_id: int, image: str = "", version: str = "") -> dict:
        return session.edit({"image": image, "version": version}, object_id, delete=True)

    finetune = FineTune(session)

    @app.post("/api/finetune", status_code=202)
    async def start_finetune(request: Request):
        body = await request.body()
        return finetune.start(await _json(request) if body.strip() else {})

    @app.get("/api/finetune")
    def finetune_status() -> dict:
        return finetune.status()

    @app.get("/api/finetune/events")
    def finetune_events() -> StreamingResponse:
        return StreamingResponse(_events(finetune), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/api/finetune/cancel")
    async def cancel_finetune():
        # Waits for the process to stop (seconds): in a worker thread, not the event loop.
        return await run_in_threadpool(finetune.cancel)

    return app


async def _events(finetune: FineTune):
    """`data: STATUS` whenever the fine-tune's status changes; the stream ends once the job has
    (or when none was ever started)."""
    sent = None
    while True:
        status = finetune.status()
        text = json.dumps(status)
        if text != sent:
            yield f"data: {text}\n\n"
            sent = text
        if status["phase"] in ENDED or status["phase"] == "idle":
            return
        await asyncio.sleep(EVENTS_POLL_S)


async def _json(request: Request):
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not JSON ({exc})") from None
