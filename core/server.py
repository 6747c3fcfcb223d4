"""The search page's web app: a JSON API under /api/ and the page itself, over a SearchService.

    app = create_app(SearchService.open("slide_index"))
    uvicorn.run(app, host="127.0.0.1", port=8000)          # what `retrieve.py serve` does

The API is documented by FastAPI at /docs and /openapi.json. The page (web/static) and the
OpenSeadragon viewer installed into web/node_modules by `npm ci --prefix web` are served by the
app itself, so the page needs no internet.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from .errors import UserError
from .search_service import MAX_UPLOAD_BYTES, NotFound, Search, SearchService
from .slide_index import SlideChanged

WEB = Path(__file__).resolve().parent.parent / "web"
STATIC = WEB / "static"
VIEWER = WEB / "node_modules" / "openseadragon" / "build" / "openseadragon"
VIEWER_INSTALL = "npm ci --prefix web"
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and headers around the file
SEARCH_ID = r"^[0-9a-f]{32}$"


class IndexSummary(BaseModel):
    model_name: str
    model_options: dict
    checkpoint: str = Field(description="file name of the checkpoint the index was built with")
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
    kind: str = Field(description='"slide", or "folder" for a folder of patch images')
    width: int | None = Field(description="level-0 width in pixels (slides)")
    height: int | None
    slide_mpp: float | None = Field(description="microns per level-0 pixel (slides)")
    patch_count: int
    thumbnail_url: str
    dzi_url: str | None = Field(description="Deep Zoom descriptor for the viewer (slides)")


class MatchOut(BaseModel):
    rank: int
    similarity: float = Field(description="mean over the model's learners of the cosine similarities")
    patch_id: int
    source_id: int
    source_name: str
    source_kind: str
    file_name: str | None = Field(description="the patch's image file (folders)")
    x: int = Field(description="level-0 box of the patch in its slide")
    y: int
    width: int
    height: int
    class_name: str | None
    image_url: str


class SlideRankOut(BaseModel):
    rank: int
    source_id: int
    name: str
    votes: int = Field(description="query patches whose first match lies on this slide")
    score: float = Field(description="mean similarity of this slide's patches among the matches")


class SearchOut(BaseModel):
    id: str
    kind: str = Field(description='"upload" or "region"')
    name: str
    query_class: str | None = Field(description="the upload's class, when its file-name prefix is one of the index's")
    source_id: int | None = Field(description="a region search's slide")
    query_boxes: list[list[int]] = Field(description="level-0 x, y, width, height of each query patch (regions)")
    query_image_url: str
    matches: list[MatchOut] = Field(description="every query patch's top-k matches, best first, each patch once")
    slides: list[SlideRankOut]


class RegionQuery(BaseModel):
    slide_id: int
    x: int = Field(ge=0, description="level-0 pixels")
    y: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    top_k: int | None = Field(default=None, ge=1, le=100)


def _source_out(row: dict) -> SourceOut:
    slide = row["kind"] == "slide"
    return SourceOut(id=row["id"], name=Path(row["path"]).name, kind=row["kind"], width=row["width"],
                     height=row["height"], slide_mpp=row["slide_mpp"], patch_count=row["patch_count"],
                     thumbnail_url=f"/api/slides/{row['id']}/thumbnail.jpeg",
                     dzi_url=f"/api/slides/{row['id']}/image.dzi" if slide else None)


def _search_out(service: SearchService, search: Search) -> SearchOut:
    result = search.result
    return SearchOut(
        id=search.id, kind=search.kind, name=search.name, query_class=result.class_name, source_id=search.source_id,
        query_boxes=result.boxes.tolist() if search.kind == "region" else [],
        query_image_url=f"/api/searches/{search.id}/query.jpeg",
        matches=[MatchOut(**row, image_url=f"/api/patches/{row['patch_id']}/image.jpeg")
                 for row in service.matches(search)],
        slides=[SlideRankOut(**row) for row in service.slide_ranking(search)])


def _image(data: bytes, media_type: str = "image/jpeg") -> Response:
    # Ids may be reused after an index is rebuilt: let the browser keep images for an hour only.
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})


def api_router(service: SearchService) -> APIRouter:
    router = APIRouter(prefix="/api")
    slide_id = PathParam(description="a slide's id in the index (see /api/slides)")

    @router.get("/index", response_model=IndexSummary, summary="The index's model, scale and size")
    def index_summary() -> IndexSummary:
        return IndexSummary(**service.summary())

    @router.get("/slides", response_model=list[SourceOut], summary="The indexed slides and folders")
    def slides(q: str = Query("", max_length=200, description="only those whose file name contains this"),
               kind: str | None = Query(None, pattern="^(slide|folder)$")) -> list[SourceOut]:
        rows = service.sources().values()
        return [_source_out(row) for row in rows if q.lower() in Path(row["path"]).name.lower()
                and (kind is None or row["kind"] == kind)]

    @router.get("/slides/{slide_id}", response_model=SourceOut, summary="One slide or folder")
    def slide(slide_id: int = slide_id) -> SourceOut:
        return _source_out(service.source(slide_id))

    @router.get("/slides/{slide_id}/thumbnail.jpeg", response_class=Response, summary="Its thumbnail")
    def thumbnail(slide_id: int = slide_id) -> Response:
        return _image(service.thumbnail(slide_id))

    @router.get("/slides/{slide_id}/image.dzi", response_class=Response, summary="Its Deep Zoom descriptor")
    def dzi(slide_id: int = slide_id) -> Response:
        return Response(service.dzi(slide_id), media_type="application/xml")

    @router.get("/slides/{slide_id}/image_files/{level}/{col}_{row}.jpeg", response_class=Response,
                summary="One Deep Zoom tile")
    def tile(level: int, col: int, row: int, slide_id: int = slide_id) -> Response:
        return _image(service.tile(slide_id, level, col, row))

    @router.get("/patches/{patch_id}/image.jpeg", response_class=Response, summary="An indexed patch's pixels")
    def patch_image(patch_id: int) -> Response:
        return _image(service.patch_image(patch_id))

    @router.post("/search/upload", response_model=SearchOut, summary="Search with an uploaded patch image")
    def search_upload(file: UploadFile = File(description=f"PNG, JPEG or TIFF, at most "
                                                           f"{MAX_UPLOAD_BYTES // 2**20} MB"),
                      top_k: int | None = Form(None, ge=1, le=100)) -> SearchOut:
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        return _search_out(service, service.search_upload(data, file.filename or "upload", top_k))

    @router.post("/search/region", response_model=SearchOut, summary="Search with a region of an indexed slide")
    def search_region(query: RegionQuery) -> SearchOut:
        box = (query.x, query.y, query.width, query.height)
        return _search_out(service, service.search_region(query.slide_id, box, query.top_k))

    @router.get("/searches/{search_id}", response_model=SearchOut, summary="A recent search again")
    def search(search_id: str = PathParam(pattern=SEARCH_ID)) -> SearchOut:
        return _search_out(service, service.search(search_id))

    @router.get("/searches/{search_id}/query.jpeg", response_class=Response, summary="The query as searched")
    def query_image(search_id: str = PathParam(pattern=SEARCH_ID)) -> Response:
        preview = service.search(search_id).preview
        if preview is None:
            raise NotFound(f"search {search_id}: its query image cannot be read any more")
        return _image(preview)

    @router.get("/searches/{search_id}/heatmap/{slide_id}.png", response_class=Response,
                summary="Each patch of a slide coloured by its similarity to the query",
                description="RGBA, the size of the slide's thumbnail; the headers X-Similarity-Low and "
                            "X-Similarity-High give the range the magma colours span.")
    def heatmap(search_id: str = PathParam(pattern=SEARCH_ID), slide_id: int = slide_id) -> Response:
        data, low, high = service.heatmap(search_id, slide_id)
        return Response(data, media_type="image/png",
                        headers={"X-Similarity-Low": f"{low:.6f}", "X-Similarity-High": f"{high:.6f}"})

    return router


def create_app(service: SearchService, viewer: Path = VIEWER) -> FastAPI:
    """The app over one service; the page's viewer is served from `viewer` when it is installed."""
    app = FastAPI(title="Histopathology image search", version="1",
                  description="Search an index of whole slides built by `retrieve.py index`: by an uploaded "
                              "patch or by a region of an indexed slide. Read only.")

    @app.middleware("http")
    async def limit_uploads(request: Request, call_next):
        # Refuse an oversized upload from its header, before its body is read.
        if request.method == "POST" and request.url.path == "/api/search/upload":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"detail": "send the upload with a Content-Length header"}, status_code=411)
            if int(length) > MAX_UPLOAD_BYTES + FORM_OVERHEAD:
                return JSONResponse({"detail": f"the upload is {int(length) / 2**20:.1f} MB; uploads are limited "
                                               f"to {MAX_UPLOAD_BYTES // 2**20} MB"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError) -> JSONResponse:
        status = 404 if isinstance(error, NotFound) else 409 if isinstance(error, SlideChanged) else \
            413 if getattr(error, "too_large", False) else 400
        return JSONResponse({"detail": str(error)}, status_code=status)

    app.include_router(api_router(service))

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
