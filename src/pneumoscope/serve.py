"""The web service: a one-page UI at `/` and a small REST API, all from one loaded model.

    POST /v1/predict[?cam=true]   multipart field `file` (JPEG, PNG, TIFF, DICOM, ...) -> label + probabilities
    GET  /v1/model                model card facts
    GET  /healthz                 liveness

Uploads stay in memory: the body is read chunk by chunk with a hard byte limit (413 past it, whatever
Content-Length claims), at most MAX_PARTS multipart parts (400 past them) and a deadline (408 when the
body has not arrived within `body_timeout`), and parsed without spooling to disk. At most
`max_requests` requests are in progress at once (503 past them), so the uploads held in memory are
bounded; /healthz is never refused, since a busy server is alive. The decoder runs at most
images.DECODE_SLOTS decodes at once. Images over the decoder's limits give 413, other unreadable images
422 with the decoder's reason. Every answer carries security headers (a CSP that allows only the page's
own inline script and style), also uvicorn's own 400 for a request it cannot parse (`uvicorn_config`);
requests for another Host are refused (400); HEAD is answered wherever GET is; there is no /docs or
/redoc (both load scripts from CDNs): /openapi.json stays. The model runs in worker threads, so the
event loop (and /healthz) stays responsive while predictions run. Answers are pydantic models
(`Prediction`, `ModelCard`, `Health`), so /openapi.json documents them.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import html
import logging
import re
import socket
import threading
import time
from importlib import resources
from pathlib import PurePath
from typing import Iterator, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, create_model
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from . import INTENDED_USE, __version__
from .bundle import is_shipped
from .runs.rundir import describe_data, recorded_data
from .runtime.classifier import Classifier, Record
from .runtime.explain import cam_png

SHIPPED_DATA = ("Trained on pediatric (age 1-5) anterior-posterior chest X-rays from one hospital; other "
                "populations, views and devices are outside what it was tested on.")  # the shipped models' data
INPUT = "1-channel grayscale in [0, 1], squashed to img_size x img_size"
METRIC_GROUPS = ("val", "internal_test", "external")  # what the model card shows of metrics.json
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and part headers on top of the file itself
# The API reads one part ('file'); every part costs parser callbacks on the event loop (2.3 million
# empty parts fit in 20 MiB: 7 s of parsing), so a body with more is refused as soon as they pass this.
MAX_PARTS = 16
BODY_TIMEOUT = 30.0  # seconds to receive a request body (20 MiB needs 5.6 Mbit/s); a stalled upload gets 408
# Requests in progress at once, past it 503 (before the body is read): bounds the memory that uploads
# held at once can take (each up to twice the upload limit while it is read). Liveness probes
# (PROBES) are not counted and never refused.
MAX_REQUESTS = 32
PROBES = ("/healthz",)
# Open connections (`pneumoscope serve`, `serve_in_thread`): one past it is closed unanswered. Bounds the
# sockets idle or slow clients hold (a connection that has not sent its headers costs ~100 KiB at most).
MAX_CONNECTIONS = 256
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # Host headers accepted besides the bound host
log = logging.getLogger(__name__)

_UPLOAD_BODY = {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": "a chest X-ray: JPEG, PNG, TIFF, BMP, WebP or DICOM"}}}}}}
_ERRORS = {400: {"description": f"malformed multipart body, more than {MAX_PARTS} parts, or a Host header this "
                                "server does not answer to"},
           408: {"description": f"the body was not received within the body timeout ({BODY_TIMEOUT:g} s by default)"},
           413: {"description": "upload over the size limit, or an image over the decoder's size or work limits"},
           415: {"description": "body is not multipart/form-data"},
           422: {"description": "no `file` field, or the file is not a readable image"},
           503: {"description": f"the server already has its maximum of requests in progress ({MAX_REQUESTS} by "
                                 "default); retry after the Retry-After seconds"}}


class ModelName(BaseModel):
    name: str
    version: str
    arch: str


class Prediction(BaseModel):
    """The answer for one uploaded X-ray (a `Record`, as the web sends it)."""

    filename: str = Field(description="the uploaded file's name, without folders")
    label: str = Field(description="the most probable class")
    probabilities: dict[str, float] = Field(description="calibrated probability per class, in class order")
    warnings: list[str] = Field(description="reasons to doubt the answer: input checks, then the model's own doubt")
    reliable: bool = Field(description="false when a warning says the input is probably not a chest X-ray")
    model: ModelName
    cam: str | None = Field(None, description="with cam=true: a Grad-CAM overlay, as a PNG data URL")


def prediction_model(classes: tuple[str, ...]) -> type[Prediction]:
    """`Prediction` for one model: `label` is one of its classes and `probabilities` are keyed by
    them, so /openapi.json names the bundle's own classes (a flower model's, not NORMAL/BACTERIA/VIRUS)."""
    label = Literal[tuple(classes)]
    return create_model("Prediction", __base__=Prediction, __doc__=Prediction.__doc__,
                        label=(label, Field(description="the most probable class")),
                        probabilities=(dict[label, float], Field(description="calibrated probability per class, "
                                                                             "in class order")))


class ModelCard(BaseModel):
    name: str
    version: str
    task: str
    arch: str
    classes: list[str]
    img_size: int
    temperature: float
    params: int
    input: str
    metrics: dict = Field(description="headline metrics per evaluation group (val, internal_test, ...)")
    training_data: str = Field(description="what this model was trained on, from its bundle's provenance")
    intended_use: str
    max_upload_mb: float


class Health(BaseModel):
    status: str
    model: str


def security_headers(page: str) -> dict[str, str]:
    """Headers for every answer. The CSP allows the page's own inline <script> (by hash) and <style>,
    images from data:/blob: URLs (the Grad-CAM overlay, the local preview) and fetches to this server
    only; nothing may frame the page (clickjacking)."""
    scripts = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                       for body in re.findall(r"<script>(.*?)</script>", page, re.S))
    csp = (f"default-src 'none'; script-src {scripts or chr(39) + 'none' + chr(39)}; style-src 'unsafe-inline'; "
           "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return {"content-security-policy": csp, "x-content-type-options": "nosniff", "x-frame-options": "DENY",
            "referrer-policy": "no-referrer"}


class HeadersMiddleware:
    """Adds fixed headers to every HTTP answer (a plain ASGI middleware: the request body stream is
    left as it is, so uploads are still read chunk by chunk)."""

    def __init__(self, app, headers: dict[str, str]):
        self.app, self.headers = app, headers

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in self.headers.items():
                    headers[key] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HeadAsGet:
    """HEAD is answered wherever GET is (RFC 9110): routed as a GET, whose headers are sent
    (Content-Length included) and whose body is dropped."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def send_without_body(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_without_body)


class RequestLimit:
    """At most `limit` requests in progress at once; one more gets 503 with Retry-After before its
    body is read, and its connection is closed. Liveness probes (PROBES) pass uncounted: a server
    busy with uploads is alive, and a probe that got 503 would have it restarted."""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.active = app, limit, 0  # one event loop: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in PROBES:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            busy = JSONResponse({"detail": f"server busy: {self.limit} requests in progress, retry shortly"}, 503,
                                headers={"retry-after": "1", "connection": "close"})
            return await busy(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def create_app(classifier: Classifier | None = None, task: str = "three", max_upload_mb: float = 20,
               allowed_hosts: tuple[str, ...] = LOCAL_HOSTS, body_timeout: float = BODY_TIMEOUT,
               max_requests: int = MAX_REQUESTS) -> FastAPI:
    """The ASGI app. Loads the shipped model for `task` once when no classifier is given. Requests
    whose Host header is not in `allowed_hosts` get 400 (DNS rebinding); "*" accepts any. An upload
    whose body has not arrived `body_timeout` seconds after its headers gets 408. Past
    `max_requests` requests in progress, 503 (/healthz is never refused)."""
    classifier = classifier or Classifier.load(task=task)
    limit = int(max_upload_mb * 2**20)
    page = notice_page(resources.files("pneumoscope").joinpath("static/index.html").read_text(encoding="utf-8"))
    meta = classifier.meta
    metrics = classifier.bundle.metrics() if classifier.bundle else {}
    data = training_data(classifier)
    card = ModelCard(name=meta.name, version=meta.version, task=meta.task, arch=meta.arch,
                     classes=list(classifier.classes), img_size=classifier.img_size,
                     temperature=classifier.temperature, params=meta.params, input=INPUT,
                     metrics={k: v for k, v in metrics.items() if k in METRIC_GROUPS}, training_data=data,
                     intended_use=f"{INTENDED_USE} {data}", max_upload_mb=max_upload_mb)
    app = FastAPI(title="pneumoscope", version=__version__,
                  description="Pediatric chest X-ray classifier. " + INTENDED_USE,
                  docs_url=None, redoc_url=None)  # both load scripts and fonts from CDNs
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.add_middleware(RequestLimit, limit=max_requests)
    app.add_middleware(HeadAsGet)
    app.state.security_headers = security_headers(page)  # also for uvicorn's own answers (uvicorn_config)
    app.add_middleware(HeadersMiddleware, headers=app.state.security_headers)  # outermost: on the 400s and 503s too

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/healthz")
    async def healthz() -> Health:
        return Health(status="ok", model=classifier.name)

    @app.get("/v1/model")
    async def model_card() -> ModelCard:
        return card

    answer_model = prediction_model(classifier.classes)

    @app.post("/v1/predict", openapi_extra={"requestBody": _UPLOAD_BODY}, responses=_ERRORS,
              response_model=answer_model, response_model_exclude_unset=True)
    async def predict(request: Request, cam: bool = Query(False, description="add a Grad-CAM overlay PNG")):
        name, data = await read_upload(request, limit, body_timeout)
        record, png = await run_in_threadpool(_infer, classifier, data, name, cam)
        if record.status != "ok":
            raise HTTPException(422, record.error or f"{name}: not a readable image")
        answer = answer_model(filename=name, label=record.label, probabilities=record.probabilities,
                              warnings=record.warnings, reliable=record.reliable,
                              model=ModelName(name=meta.name, version=meta.version, arch=meta.arch))
        if cam:  # set only on request: without cam=true the field is left out of the answer
            answer.cam = "data:image/png;base64," + base64.b64encode(png).decode() if png else None
        return answer

    return app


NOTICE_MARK = "<!-- INTENDED_USE -->"  # where static/index.html shows the intended-use notice


def notice_page(page: str) -> str:
    """The web page with pneumoscope.INTENDED_USE in its notice (the one text the card and the DICOM
    SR quote too)."""
    if NOTICE_MARK not in page:
        raise ValueError(f"static/index.html has no {NOTICE_MARK} for the intended-use notice")
    return page.replace(NOTICE_MARK, html.escape(INTENDED_USE))


def training_data(classifier: Classifier) -> str:
    """One sentence on the model's own data for the card and the page footer: its provenance's split
    sizes and source (rundir.data_facts); for a shipped model also what population that was."""

    bundle = classifier.bundle
    described = describe_data(recorded_data(classifier.meta, bundle.metrics() if bundle else {}))
    shipped = bundle is not None and is_shipped(bundle.path)
    if shipped:
        return SHIPPED_DATA + (f" Its split: {described}." if described else "")
    if described:
        return f"Trained and measured on {described}; other data are outside what it was tested on."
    return "Its training data are not recorded in this model's bundle; treat its answers as untested."


def _infer(classifier: Classifier, data: bytes, name: str, cam: bool) -> tuple[Record, bytes | None]:
    """Runs in a worker thread. The classifier serialises what must be serialised (its PyTorch model,
    which Grad-CAM hooks into); decoding and ONNX Runtime predictions run in parallel. With `cam`
    the upload is decoded once for both the prediction and the heat map. An image over the
    decoder's size limits is 413, any other unreadable one 422."""
    decoded = classifier.decode(data, name, keep_gray=cam)
    if decoded.error:
        raise HTTPException(413 if decoded.too_large else 422, decoded.error)
    record = classifier.records(classifier.score_decoded([decoded]))[0]
    if not cam:
        return record, None

    return record, cam_png(classifier, record, decoded)


async def read_upload(request: Request, limit: int, timeout: float = BODY_TIMEOUT) -> tuple[str, bytes]:
    """The `file` part of a multipart/form-data request as (filename, bytes), read into memory
    chunk by chunk; 413 as soon as the body passes `limit` (plus form overhead), 400 as soon as it
    has more than MAX_PARTS parts, 408 when it has not all arrived within `timeout` seconds."""
    too_large = HTTPException(413, f"upload is over the {limit / 2**20:g} MiB limit")
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise HTTPException(415, "send the image as multipart/form-data in a field named 'file'")
    if len(params[b"boundary"]) > 70:  # RFC 2046's maximum; python-multipart raises past 256
        raise HTTPException(400, "malformed multipart body (boundary longer than 70 characters)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FORM_OVERHEAD:
        raise too_large
    try:
        async with asyncio.timeout(timeout):
            parts = await _read_parts(request, params[b"boundary"], limit + FORM_OVERHEAD, too_large)
    except TimeoutError:  # close the connection: the client is not sending the rest
        raise HTTPException(408, f"the upload was not received within {timeout:g} s",
                            headers={"connection": "close"}) from None

    for headers, body in parts:
        _, disposition = parse_options_header(headers.get(b"content-disposition"))
        if disposition.get(b"name") == b"file":
            if len(body) > limit:
                raise too_large
            filename = disposition.get(b"filename", b"").decode("utf-8", "replace")
            return PurePath(filename.replace("\\", "/")).name[:200] or "upload", bytes(body)
    raise HTTPException(422, "no form field named 'file' in the upload")


async def _read_parts(request: Request, boundary: bytes, max_bytes: int, too_large: HTTPException
                      ) -> list[tuple[dict[bytes, bytes], bytearray]]:
    """The parts of the multipart body as (headers, body) pairs, parsed as the chunks arrive.
    python-multipart bounds the headers of a part (8); the parts are counted here, because Starlette's
    own limits (`request.form(max_fields=, max_files=)`) come with its parser, which spools files
    over 1 MiB to disk."""
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    field, value = bytearray(), bytearray()

    def part_begin():
        if len(parts) == MAX_PARTS:
            raise HTTPException(400, f"multipart body with more than {MAX_PARTS} parts: send one field named 'file'")
        parts.append(({}, bytearray()))

    def header_end():
        parts[-1][0][bytes(field).lower()] = bytes(value)
        field.clear(), value.clear()

    parser = MultipartParser(boundary, callbacks={
        "on_part_begin": part_begin,
        "on_header_field": lambda data, start, end: field.extend(data[start:end]),
        "on_header_value": lambda data, start, end: value.extend(data[start:end]),
        "on_header_end": header_end,
        "on_part_data": lambda data, start, end: parts[-1][1].extend(data[start:end]),
    })
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as err:
        raise HTTPException(422, f"malformed multipart body ({err})") from None
    except ClientDisconnect:  # the client went away mid-upload: nobody to answer, one log line
        log.info("client disconnected during the upload (%d bytes received)", received)
        raise HTTPException(400, "client disconnected during the upload") from None
    return parts


def uvicorn_config(app: FastAPI, **options):
    """uvicorn's Config for `app`, as `pneumoscope serve` runs it: the HTTP protocol of `_protocol`
    (security headers on uvicorn's own 400, at most MAX_CONNECTIONS connections) and no
    `limit_concurrency` (the app limits requests itself, without refusing probes)."""
    import uvicorn

    headers = getattr(app.state, "security_headers", {})
    return uvicorn.Config(app, http=_protocol(headers), limit_concurrency=None, **options)


def _protocol(headers: dict[str, str]) -> type:
    """uvicorn's h11 protocol with two changes. A request h11 cannot parse (a bare CR in a header, no
    Host or two, a negative Content-Length, headers over 16 KiB) is answered by uvicorn itself, below
    the app and its HeadersMiddleware: that 400 gets the security headers here. And a connection past
    MAX_CONNECTIONS is closed unanswered."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    extra = [(name.encode(), value.encode()) for name, value in headers.items()]

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > MAX_CONNECTIONS:
                transport.close()

        def send_400_response(self, msg: str) -> None:  # uvicorn's, with the security headers
            headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close"), *extra]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=msg.encode("ascii")), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return Protocol


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Runs `app` on a real uvicorn server in a background thread (port 0: a free one), configured
    as `pneumoscope serve` runs it, and yields its base URL; for tests, the screenshot script and
    notebooks."""
    import uvicorn

    sock = socket.socket()
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread stopped before it started")
            time.sleep(0.02)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def run(host: str = "127.0.0.1", port: int = 8000, task: str = "three", checkpoint: str | None = None,
        max_upload_mb: float = 20, allowed_hosts: tuple[str, ...] = (), body_timeout: float = BODY_TIMEOUT) -> None:
    """Serves until interrupted. Host headers accepted: loopback names, the bound host, `allowed_hosts`.
    At most MAX_REQUESTS requests in progress (503 past them, /healthz excepted) and MAX_CONNECTIONS
    connections; uvicorn closes an idle keep-alive connection after its default 5 s."""
    import uvicorn

    bound = () if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host,)
    hosts = (*LOCAL_HOSTS, *bound, *allowed_hosts)
    app = create_app(Classifier.load(checkpoint, task=task), task=task, max_upload_mb=max_upload_mb,
                     allowed_hosts=hosts, body_timeout=body_timeout)
    uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level="info")).run()
