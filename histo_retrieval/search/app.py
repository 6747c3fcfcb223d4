"""The search page's web app: a JSON API under /api/ and the page itself, over a SearchService.

    app = create_app(SearchService.open("slide_index"), allowed_hosts=["search.example.org"])
    uvicorn.run(app, host="127.0.0.1", port=8000, server_header=False)  # what `retrieve.py serve` does

The API is one APIRouter per resource (the index, slides, patches, searches), whose routes get the
service through Depends(get_service); its response models are built from the service's dataclasses
(SourceRow, Match, SlideRank, Search) in one place each, their `of`. The API is documented by FastAPI
at /docs and /openapi.json. The page (web/static) and the OpenSeadragon viewer installed into
web/node_modules by `npm ci --prefix web` are served by the app itself, so the page needs no
internet. RequestGuard checks each request's host, origin and body size before the app reads it
(docs/search_page.md, "Security").
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from histo_retrieval.errors import UserError
from histo_retrieval.search.index import SlideChanged, SourceKind, SourceRow
from histo_retrieval.search.queries import Match, SlideRank
from histo_retrieval.search.service import (MAX_BODY_BYTES, MAX_ID, MAX_PAGE_SIZE, MAX_UPLOAD_BYTES,
                                            MAX_UPLOAD_SIDE, PAGE_SIZE, SIMILAR_SLIDES, UPLOAD_FORM_OVERHEAD, NotFound,
                                            Search, SearchKind, SearchService)

WEB = Path(__file__).resolve().parents[2] / "web"  # the checkout's web/: the page and its viewer from npm
STATIC = WEB / "static"
VIEWER = WEB / "node_modules" / "openseadragon" / "build" / "openseadragon"
VIEWER_INSTALL = "npm ci --prefix web"
SEARCH_ID = r"^[0-9a-f]{32}$"
TOTAL_HEADER = "X-Total-Count"  # /api/slides: how many sources match its filter, over all its pages
UPLOAD_ROUTE = "/api/search/upload"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # the names of this machine a browser may use
UNSAFE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
DOCS_PATHS = ("/docs", "/redoc", "/docs/oauth2-redirect")  # FastAPI's own pages
# The page's own scripts, styles and images only. OpenSeadragon injects one fixed <style> (allowed by
# its hash), draws on a canvas and may decode tiles in a worker it makes from a blob.
OSD_STYLE_HASH = "sha256-9xTiqzfwFaL2SGb1rmr8gysEwVVjIvqWAgmZgqFqpEE="  # OpenSeadragon 6.1.1's; a new one
# makes the browser log a refused style (tests/test_search_page.py fails): hash its text again
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' '" + OSD_STYLE_HASH + "'; "
               "img-src 'self' data: blob:; connect-src 'self'; worker-src 'self' blob:; object-src 'none'; "
               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# FastAPI's /docs and /redoc load Swagger UI and ReDoc (and ReDoc's fonts) from CDNs and run an inline
# script: those pages only, which show nothing but the API's description and need the internet anyway.
DOCS_CDN = "https://cdn.jsdelivr.net"
DOCS_POLICY = (f"default-src 'self'; script-src 'self' 'unsafe-inline' {DOCS_CDN}; style-src 'self' 'unsafe-inline' "
               f"{DOCS_CDN} https://fonts.googleapis.com; font-src 'self' https://fonts.gstatic.com; img-src 'self' "
               "data: https://fastapi.tiangolo.com https://cdn.redoc.ly; worker-src 'self' blob:; connect-src 'self'; "
               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


class IndexSummary(BaseModel):
    model_name: str
    model_options: dict
    checkpoint: str = Field(description="file name of the checkpoint (or weights file) the index was built with")
    encoder: str = Field(description="the encoder the index was built with: a checkpoint's file name, "
                                     "timm:<architecture>, a preset's name or histogram")
    encoder_kind: str = Field(description='"checkpoint", "timm", "preset" or "histogram"')
    crop_size: int
    dim: int
    mpp: float = Field(description="microns per pixel of the indexed patches")
    patch_size: int
    tissue_threshold: float
    index_type: str
    slides: int
    folders: int
    patches: int
    classes: list[str]
    top_k: int = Field(description="matches per query patch unless a search asks for another number")


class SourceOut(BaseModel):
    id: int
    name: str
    kind: SourceKind = Field(description='"slide", or "folder" for a folder of patch images')
    width: int | None = Field(description="level-0 width in pixels (slides)")
    height: int | None
    slide_mpp: float | None = Field(description="microns per level-0 pixel (slides)")
    patch_count: int
    thumbnail_url: str
    dzi_url: str | None = Field(description="Deep Zoom descriptor for the viewer (slides)")
    label: str | None = Field(default=None, description="diagnosis or subtype (`retrieve.py label`), if given")
    patient: str | None = Field(default=None, description="the slide's patient (`retrieve.py label`), if given")

    @classmethod
    def of(cls, row: SourceRow) -> SourceOut:
        return cls(id=row.id, name=row.name, kind=row.kind, width=row.width, height=row.height,
                   slide_mpp=row.slide_mpp, patch_count=row.patch_count, label=row.label, patient=row.patient,
                   thumbnail_url=f"/api/slides/{row.id}/thumbnail.jpeg",
                   dzi_url=f"/api/slides/{row.id}/image.dzi" if row.kind == "slide" else None)


class MatchOut(BaseModel):
    rank: int
    similarity: float = Field(description="mean over the model's learners of the cosine similarities")
    patch_id: int
    source_id: int
    source_name: str
    source_kind: SourceKind
    file_name: str | None = Field(description="the patch's image file (folders)")
    x: int = Field(description="level-0 box of the patch in its slide")
    y: int
    width: int
    height: int
    class_name: str | None
    image_url: str

    @classmethod
    def of(cls, match: Match) -> MatchOut:
        p = match.patch
        return cls(rank=match.rank, similarity=match.similarity, patch_id=p.id, source_id=p.source_id,
                   source_name=Path(p.source).name, source_kind=p.source_kind,
                   file_name=Path(p.file).name if p.file else None, x=p.x, y=p.y, width=p.width, height=p.height,
                   class_name=p.class_name, image_url=f"/api/patches/{p.id}/image.jpeg")


class SlideRankOut(BaseModel):
    rank: int
    source_id: int
    name: str
    votes: int = Field(description="query patches whose first match lies on this slide")
    score: float = Field(description="mean similarity of this slide's patches among the matches")

    @classmethod
    def of(cls, slide: SlideRank) -> SlideRankOut:
        return cls(rank=slide.rank, source_id=slide.source_id, name=Path(slide.source).name, votes=slide.votes,
                   score=slide.score)


class SimilarSlideOut(BaseModel):
    rank: int
    id: int = Field(description="the slide's id in the index")
    name: str
    votes: int = Field(description="query patches whose first match lies on this slide")
    score: float = Field(description="mean similarity of this slide's patches among the matches")
    label: str | None = Field(description="its diagnosis, when the index has labels (`retrieve.py label`)")
    patient: str | None
    thumbnail_url: str

    @classmethod
    def of(cls, slide: SlideRank, row: SourceRow) -> SimilarSlideOut:
        return cls(rank=slide.rank, id=slide.source_id, name=row.name, votes=slide.votes, score=slide.score,
                   label=row.label, patient=row.patient, thumbnail_url=f"/api/slides/{row.id}/thumbnail.jpeg")


class SimilarSlidesOut(BaseModel):
    id: int = Field(description="the query slide's id")
    name: str
    label: str | None
    query_patches: int = Field(description="its stored patches searched with (its mosaic with --mosaic)")
    slides: list[SimilarSlideOut] = Field(description="the other slides, best first, the query slide never among them")


class SearchOut(BaseModel):
    id: str
    kind: SearchKind = Field(description='"upload" or "region"')
    name: str
    query_class: str | None = Field(description="the upload's class, when its file-name prefix is one of the index's")
    source_id: int | None = Field(description="a region search's slide")
    query_boxes: list[list[int]] = Field(description="level-0 x, y, width, height of each query patch (regions)")
    query_image_url: str
    matches: list[MatchOut] = Field(description="every query patch's top-k matches, best first, each patch once")
    slides: list[SlideRankOut]

    @classmethod
    def of(cls, search: Search, service: SearchService) -> SearchOut:
        result = search.result
        return cls(id=search.id, kind=search.kind, name=search.name, query_class=result.class_name,
                   source_id=search.source_id, query_boxes=result.boxes.tolist() if search.kind == "region" else [],
                   query_image_url=f"/api/searches/{search.id}/query.jpeg",
                   matches=[MatchOut.of(match) for match in service.matches(search)],
                   slides=[SlideRankOut.of(slide) for slide in service.slide_ranking(search)])


class RegionQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slide_id: int = Field(ge=0, le=MAX_ID)
    x: int = Field(ge=0, description="level-0 pixels")
    y: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    top_k: int | None = Field(default=None, ge=1, le=100)


def _image(data: bytes, media_type: str = "image/jpeg") -> Response:
    # Ids may be reused after an index is rebuilt: let the browser keep images for an hour only.
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})


# ----------------------------------------------------------------------------- the API, one router per resource
def get_service(request: Request) -> SearchService:
    """The service the app answers from (create_app keeps it in app.state)."""
    return request.app.state.service


Service = Annotated[SearchService, Depends(get_service)]
SlideId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="a slide's id in the index (see /api/slides)")]
PatchId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="an indexed patch's id")]
SearchId = Annotated[str, PathParam(pattern=SEARCH_ID)]

index_routes = APIRouter(prefix="/api/index", tags=["index"])
slide_routes = APIRouter(prefix="/api/slides", tags=["slides"])
patch_routes = APIRouter(prefix="/api/patches", tags=["patches"])
search_routes = APIRouter(prefix="/api", tags=["searches"])


@index_routes.get("", response_model=IndexSummary, summary="The index's model, scale and size")
def index_summary(service: Service) -> IndexSummary:
    return IndexSummary(**service.summary())


@slide_routes.get("", response_model=list[SourceOut], summary="The indexed slides and folders, a page at a time",
                  description=f"At most `limit` of them from the `offset`-th, by id; the header {TOTAL_HEADER} says "
                              "how many match in all (ask for the next page at offset + limit while it is less). "
                              "Filtered and counted by the index's database: an archive of 100,000 slides is never "
                              "read whole.",
                  responses={200: {"headers": {TOTAL_HEADER: {"description": "how many match q and kind in all",
                                                              "schema": {"type": "integer"}}}}})
def slides(service: Service, response: Response,
           q: str = Query("", max_length=200, description="only those whose file name contains this (ASCII letters "
                                                          "of either case; % and _ are plain characters)"),
           kind: SourceKind | None = Query(None),
           offset: int = Query(0, ge=0, le=MAX_ID, description="how many matching ones to skip, by id"),
           limit: int = Query(PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE, description="how many to list, at most")
           ) -> list[SourceOut]:
    rows, total = service.source_page(offset, limit, q, kind)
    response.headers[TOTAL_HEADER] = str(total)
    return [SourceOut.of(row) for row in rows]


@slide_routes.get("/{slide_id}", response_model=SourceOut, summary="One slide or folder")
def slide(service: Service, slide_id: SlideId) -> SourceOut:
    return SourceOut.of(service.source(slide_id))


@slide_routes.get("/{slide_id}/thumbnail.jpeg", response_class=Response, summary="Its thumbnail")
def thumbnail(service: Service, slide_id: SlideId) -> Response:
    return _image(service.thumbnail(slide_id))


@slide_routes.get("/{slide_id}/image.dzi", response_class=Response, summary="Its Deep Zoom descriptor")
def dzi(service: Service, slide_id: SlideId) -> Response:
    return Response(service.dzi(slide_id), media_type="application/xml")


@slide_routes.get("/{slide_id}/image_files/{level}/{col}_{row}.jpeg", response_class=Response,
                  summary="One Deep Zoom tile")
def tile(service: Service, level: int, col: int, row: int, slide_id: SlideId) -> Response:
    return _image(service.tile(slide_id, level, col, row))


@slide_routes.get("/{slide_id}/similar", response_model=SimilarSlidesOut, summary="The slides most like it",
                  description="The slide's own stored patch vectors (its mosaic when the index was built with "
                              "--mosaic) search the index; the other slides are ranked as `retrieve.py query` of "
                              "the slide ranks them: by the votes of its patches' first matches, then by mean "
                              "similarity. Reads only what the index holds. 400 for a folder of patch images.")
def similar(service: Service, slide_id: SlideId,
            top: int = Query(SIMILAR_SLIDES, ge=1, le=100, description="how many slides to list, at most")
            ) -> SimilarSlidesOut:
    query_patches, ranked = service.similar_slides(slide_id, top)
    row, sources = service.source(slide_id), service.sources_by_id(slide.source_id for slide in ranked)
    return SimilarSlidesOut(id=row.id, name=row.name, label=row.label, query_patches=query_patches,
                            slides=[SimilarSlideOut.of(slide, sources[slide.source_id]) for slide in ranked
                                    if slide.source_id in sources])


@patch_routes.get("/{patch_id}/image.jpeg", response_class=Response, summary="An indexed patch's pixels")
def patch_image(service: Service, patch_id: PatchId) -> Response:
    return _image(service.patch_image(patch_id))


@search_routes.post("/search/upload", response_model=SearchOut, summary="Search with an uploaded patch image")
def search_upload(service: Service,
                  file: UploadFile = File(description=f"PNG, JPEG or TIFF of one frame, at most "
                                                      f"{MAX_UPLOAD_BYTES // 2**20} MB and {MAX_UPLOAD_SIDE} x "
                                                      f"{MAX_UPLOAD_SIDE} pixels"),
                  top_k: int | None = Form(None, ge=1, le=100)) -> SearchOut:
    return SearchOut.of(service.search_upload(file.file, file.filename, top_k), service)


@search_routes.post("/search/region", response_model=SearchOut, summary="Search with a region of an indexed slide")
def search_region(service: Service, query: RegionQuery) -> SearchOut:
    box = (query.x, query.y, query.width, query.height)
    return SearchOut.of(service.search_region(query.slide_id, box, query.top_k), service)


@search_routes.get("/searches/{search_id}", response_model=SearchOut, summary="A recent search again")
def search(service: Service, search_id: SearchId) -> SearchOut:
    return SearchOut.of(service.search(search_id), service)


@search_routes.get("/searches/{search_id}/query.jpeg", response_class=Response, summary="The query as searched")
def query_image(service: Service, search_id: SearchId) -> Response:
    preview = service.search(search_id).preview
    if preview is None:
        raise NotFound(f"search {search_id}: its query image cannot be read any more")
    return _image(preview)


@search_routes.get("/searches/{search_id}/heatmap/{slide_id}.png", response_class=Response,
                   summary="Each patch of a slide coloured by its similarity to the query",
                   description="RGBA, the size of the slide's thumbnail; the headers X-Similarity-Low and "
                               "X-Similarity-High give the range the magma colours span.")
def heatmap(service: Service, search_id: SearchId, slide_id: SlideId) -> Response:
    data, low, high = service.heatmap(search_id, slide_id)
    return Response(data, media_type="image/png",
                    headers={"X-Similarity-Low": f"{low:.6f}", "X-Similarity-High": f"{high:.6f}"})


API_ROUTERS = (index_routes, slide_routes, patch_routes, search_routes)


# ----------------------------------------------------------------------------- requests checked before the app
class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes its route's limit: FastAPI lets an HTTPException out of
    its body parsing as it is, so the client gets the 413 and its message."""


def _json(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _host_name(host: str) -> str:
    """A host name or address as --host, --allowed-hosts or a Host header give it, without its
    port or IPv6 brackets, lower case: "[::1]:8000" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host if host.count(":") > 1 else host.split(":", 1)[0]


def _origin(scheme: str, host: str) -> tuple[str, str, int] | None:
    """(scheme, host, port), the default port filled in; None when they make no origin."""
    try:
        parts = urlsplit(f"{scheme}://{host}")
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    return (parts.scheme, parts.hostname, port) if parts.hostname and port else None


def _same_origin(origin: str, scheme: str, host: str) -> bool:
    """Whether a request's Origin header ("null" from a sandboxed page) is the server's own: the
    request's scheme, and the host and port of its Host header."""
    sent_scheme, _, sent_host = origin.partition("://")
    own = _origin(scheme, host)
    return own is not None and _origin(sent_scheme, sent_host) == own


class RequestGuard:
    """Every request passes here before the app sees it (pure ASGI, so nothing is read first): its
    Host must be one the server was started for (a DNS-rebinding page's is not), a POST from a page
    must come from the server's own origin, and its body is counted as it arrives and refused past
    its route's limit, whatever Content-Length says. Every response gets the security headers."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str]) -> None:
        self.app = app
        self.hosts = sorted({_host_name(host) for host in hosts})

    def limit(self, scope: Scope) -> int:
        upload = scope["method"] == "POST" and scope["path"] == UPLOAD_ROUTE
        return MAX_UPLOAD_BYTES + UPLOAD_FORM_OVERHEAD if upload else MAX_BODY_BYTES

    def too_large(self, scope: Scope, size: int | None) -> str:
        """Why a body is refused: its declared `size`, or None once more than the limit has arrived."""
        if self.limit(scope) > MAX_BODY_BYTES:
            sent = f"more than {MAX_UPLOAD_BYTES // 2**20} MB" if size is None else f"{size / 2**20:.1f} MB"
            return f"the upload is {sent}; uploads are limited to {MAX_UPLOAD_BYTES // 2**20} MB"
        sent = f"more than {MAX_BODY_BYTES:,}" if size is None else f"{size:,}"
        return f"the request body is {sent} bytes; {scope['path']} takes at most {MAX_BODY_BYTES:,} bytes"

    def refusal(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        host = headers.get("host", "")
        if _host_name(host) not in self.hosts:
            return _json(400, f"Host {host!r}: not a name this server answers to ({', '.join(self.hosts)}); "
                              f"behind a reverse proxy, start it with --allowed-hosts {_host_name(host) or 'NAME'}")
        origin = headers.get("origin")
        if scope["method"] in UNSAFE_METHODS and origin is not None and not _same_origin(origin, scope["scheme"],
                                                                                          host):
            return _json(403, f"Origin {origin}: a page of another site may not send requests here; use the "
                              f"search page itself, {scope['scheme']}://{host}/")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit(scope):
            return _json(413, self.too_large(scope, int(length)))
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = DOCS_POLICY if scope["path"] in DOCS_PATHS else PAGE_POLICY
        started = False

        async def send_secured(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff"),
                                      (b"content-security-policy", policy.encode())]
            await send(message)

        refused = self.refusal(scope, Headers(scope=scope))
        if refused is not None:
            await refused(scope, receive, send_secured)
            return
        limit, received = self.limit(scope), 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(413, self.too_large(scope, None))
            return message

        try:
            await self.app(scope, counted, send_secured)
        except BodyTooLarge as error:  # raised where no handler turned it into the response
            if started:
                raise
            await _json(413, error.detail)(scope, receive, send_secured)


async def user_error(request: Request, error: UserError) -> JSONResponse:
    """A UserError as its HTTP status (404 NotFound, 409 SlideChanged, BadInput's own, else 400),
    its message without this machine's paths."""
    status = 404 if isinstance(error, NotFound) else 409 if isinstance(error, SlideChanged) else \
        getattr(error, "status", 400)
    return _json(status, get_service(request).public_message(str(error)))


# ----------------------------------------------------------------------------- the app
def create_app(service: SearchService, viewer: Path = VIEWER, allowed_hosts: Iterable[str] = ()) -> FastAPI:
    """The app over one service; the page's viewer is served from `viewer` when it is installed.
    Requests are answered for this machine's names (LOCAL_HOSTS) and `allowed_hosts` only."""
    app = FastAPI(title="Histopathology image search", version="1",
                  description="Search an index of whole slides built by `retrieve.py index`: by an uploaded "
                              "patch or by a region of an indexed slide. Read only.")
    app.state.service = service
    app.add_middleware(RequestGuard, hosts=[*LOCAL_HOSTS, *allowed_hosts])
    app.add_exception_handler(UserError, user_error)
    for router in API_ROUTERS:
        app.include_router(router)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/{rest:path}", include_in_schema=False)
    def unknown_api(rest: str) -> None:
        raise HTTPException(404, f"/api/{rest}: no such API route; /docs lists them")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if viewer.is_dir():
        app.mount("/vendor/openseadragon", StaticFiles(directory=viewer), name="openseadragon")
    return app


def viewer_installed(viewer: Path = VIEWER) -> bool:
    return (viewer / "openseadragon.min.js").is_file()
