"""The search page's limits and defences: request bodies counted as they arrive whatever their
headers say, bounded JSON, uploads bounded in pixels and formats and decoded a few at a time, file
names taken as labels, ids kept in range, hosts and origins checked, security headers, and no path
of this machine in an error. The tests marked slow send the same attacks to a real `retrieve.py
serve` over a socket and watch its memory."""
from __future__ import annotations

import asyncio
import io
import json
import re
import select
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import EpsImagePlugin, Image

import retrieve
from histo_retrieval.search import app as server
from histo_retrieval.search import service as search_service
from histo_retrieval.data.datasets import eval_crop
from histo_retrieval.search.service import (MAX_BODY_BYTES, MAX_UPLOAD_BYTES, MAX_UPLOAD_SIDE, UPLOAD_FORM_OVERHEAD,
                                 SearchService)

REPO = Path(__file__).resolve().parents[1]
UPLOAD = "/api/search/upload"
REGION = "/api/search/region"
CHUNK = 64 * 1024


def encoded(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


def blank_png(width: int, height: int) -> bytes:
    """A grey PNG of many pixels and few bytes (a 6000 x 6000 one is about 35 KB)."""
    return encoded(np.zeros((height, width), np.uint8), optimize=True)


def multipart(filename: bytes, data: bytes, boundary: str = "b0undary") -> tuple[bytes, dict]:
    """A multipart body with the file name exactly as given (bytes: NUL, dots, any length)."""
    body = (f"--{boundary}\r\n".encode() + b'Content-Disposition: form-data; name="file"; filename="' + filename
            + b'"\r\nContent-Type: application/octet-stream\r\n\r\n' + data + f"\r\n--{boundary}--\r\n".encode())
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def region_of(client) -> dict:
    slide = client.get("/api/slides", params={"kind": "slide"}).json()[0]
    return {"slide_id": slide["id"], "x": 64, "y": 64, "width": 64, "height": 64}


def call_asgi(app, method: str, path: str, headers: dict[str, str], body_chunks) -> tuple[int, dict, int]:
    """Send a request straight to the ASGI app, its body pulled chunk by chunk from `body_chunks`:
    (status, JSON answer, bytes of the body the app pulled)."""
    pulled, answer = 0, {"status": None, "body": b""}
    chunks = iter(body_chunks)

    async def receive() -> dict:
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in {"host": "127.0.0.1:8000", **headers}.items()],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    return answer["status"], json.loads(answer["body"]), pulled


def zeros(total: int):
    """`total` bytes in CHUNK pieces, made as they are asked for."""
    for _ in range(total // CHUNK):
        yield b"\0" * CHUNK


# ----------------------------------------------------------------------------- 4: bodies counted as they arrive
def test_an_upload_with_a_lying_length_is_cut_off_at_the_limit(service):
    app = server.create_app(service)
    start, _ = multipart(b"big.png", b"")
    head = start[:start.index(b"\r\n\r\n") + 4]
    status, answer, pulled = call_asgi(app, "POST", UPLOAD, {
        "content-type": "multipart/form-data; boundary=b0undary", "content-length": "100",
        "transfer-encoding": "chunked"}, [head, *zeros(30 * 2**20)])
    assert status == 413 and answer["detail"] == "the upload is more than 20 MB; uploads are limited to 20 MB"
    assert pulled <= MAX_UPLOAD_BYTES + UPLOAD_FORM_OVERHEAD + CHUNK  # not the 30 MB sent


def test_an_upload_declared_too_large_is_refused_before_its_body_is_read(service):
    status, answer, pulled = call_asgi(server.create_app(service), "POST", UPLOAD, {
        "content-type": "multipart/form-data; boundary=b0undary", "content-length": str(30 * 2**20)},
        zeros(30 * 2**20))
    assert (status, answer["detail"], pulled) == (413, "the upload is 30.0 MB; uploads are limited to 20 MB", 0)


# ----------------------------------------------------------------------------- 5: bounded JSON, no unknown fields
def test_a_region_search_with_a_huge_padding_field_is_refused(client, service):
    padded = json.dumps({**region_of(client), "padding": "x" * (50 * 2**20)}).encode()
    response = client.post(REGION, content=padded, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["detail"] == (f"the request body is {len(padded):,} bytes; {REGION} takes at most "
                                         f"{MAX_BODY_BYTES:,} bytes")
    # The same without a Content-Length: cut off once the limit has arrived.
    pieces = [padded[i:i + CHUNK] for i in range(0, len(padded), CHUNK)]
    status, answer, pulled = call_asgi(server.create_app(service), "POST", REGION,
                                       {"content-type": "application/json"}, pieces)
    assert status == 413 and answer["detail"].startswith(f"the request body is more than {MAX_BODY_BYTES:,} bytes")
    assert pulled <= MAX_BODY_BYTES + CHUNK


def test_a_region_search_with_an_unknown_field_is_refused(client):
    response = client.post(REGION, json={**region_of(client), "pad": "x"})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert (error["loc"], error["msg"]) == (["body", "pad"], "Extra inputs are not permitted")
    assert client.post(REGION, json=region_of(client)).status_code == 200


def test_any_route_refuses_a_body_declared_over_a_few_kilobytes(service):
    status, answer, pulled = call_asgi(server.create_app(service), "GET", "/api/index",
                                       {"content-length": str(2**20)}, zeros(2**20))
    assert (status, pulled) == (413, 0)
    assert answer["detail"] == f"the request body is {2**20:,} bytes; /api/index takes at most 4,096 bytes"


# ----------------------------------------------------------------------------- 6: pixels and decoding bounded
@pytest.mark.parametrize("width, height", [(6000, 6000), (MAX_UPLOAD_SIDE + 1, 16), (16, MAX_UPLOAD_SIDE + 1)])
def test_uploads_of_too_many_pixels_are_refused_from_their_header(client, width, height):
    data = blank_png(width, height)
    assert len(data) < 100_000  # small in bytes: only the pixel cap can refuse it
    response = client.post(UPLOAD, files={"file": ("wide.png", data, "image/png")})
    assert response.status_code == 413
    assert response.json()["detail"] == (f"wide.png: {width} x {height} pixels; uploads are limited to 4096 x 4096 "
                                         "pixels (a patch at the index's scale is enough)")


def test_an_upload_at_the_pixel_cap_is_searched(client):
    response = client.post(UPLOAD, files={"file": ("wide.png", blank_png(MAX_UPLOAD_SIDE, 40), "image/png")})
    assert response.status_code == 200, response.text


def test_a_large_upload_is_searched_by_its_centre_crop_and_previewed_small(service):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (701, 1000, 3), np.uint8)
    whole = service.search_upload(encoded(pixels), "whole.png")
    crop = eval_crop(service.index.settings.crop_size)(Image.fromarray(pixels)).permute(1, 2, 0).numpy()
    centre = service.search_upload(encoded(crop), "centre.png")
    assert np.array_equal(whole.result.vectors, centre.result.vectors)
    assert max(Image.open(io.BytesIO(whole.preview)).size) == search_service.PREVIEW_SIDE


def test_uploads_are_decoded_a_few_at_a_time(service, monkeypatch):
    inside, most, lock = 0, 0, threading.Lock()
    decode = search_service.check_upload

    def slow_decode(upload, filename):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.3)  # long enough for every thread to arrive while one decodes
        with lock:
            inside -= 1
        return decode(upload, filename)

    monkeypatch.setattr(search_service, "check_upload", slow_decode)
    data = encoded(np.full((40, 40, 3), 128, np.uint8))
    threads = [threading.Thread(target=service.search_upload, args=(data, f"q{i}.png")) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == search_service.DECODES_AT_ONCE


# ----------------------------------------------------------------------------- 7: formats
def tiny_eps() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
            b"newpath 0 0 moveto 8 0 lineto 8 8 lineto closepath fill\nshowpage\n%%EOF\n")


@pytest.mark.parametrize("name, make", [
    ("patch.gif", lambda: encoded(np.zeros((40, 40, 3), np.uint8), "GIF")),
    ("patch.bmp", lambda: encoded(np.zeros((40, 40, 3), np.uint8), "BMP")),
    ("patch.eps", tiny_eps),
    ("patch.webp", lambda: encoded(np.zeros((40, 40, 3), np.uint8), "WEBP")),
    ("notes.txt", lambda: b"these are not pixels"),
])
def test_formats_other_than_png_jpeg_tiff_get_415_and_never_reach_ghostscript(client, monkeypatch, name, make):
    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(a) or Image.new("RGB", (8, 8)))
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs")  # as if Ghostscript were installed
    response = client.post(UPLOAD, files={"file": (name, make(), "application/octet-stream")})
    assert response.status_code == 415
    assert response.json()["detail"] == f"{name}: not a PNG, JPEG or TIFF image; save the patch in one of those formats"
    assert called == []


@pytest.mark.parametrize("fmt", ["TIFF", "PNG"])
def test_an_image_of_several_frames_gets_415(client, fmt):
    frames = [Image.fromarray(np.full((40, 40, 3), value, np.uint8)) for value in (0, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:])
    name = f"pages.{fmt.lower()}"
    response = client.post(UPLOAD, files={"file": (name, buffer.getvalue(), "application/octet-stream")})
    assert response.status_code == 415
    assert response.json()["detail"] == f"{name}: an image of several frames; upload a single patch image"


# ----------------------------------------------------------------------------- 8: names and ids
@pytest.mark.parametrize("filename, words", [
    (b"..", "upload file name '..': not a file name"),
    (b".", "upload file name '.': not a file name"),
    (b"a\0b.png", "upload file name 'a\\x00b.png': not a file name"),
    (b"x" * 300 + b".png", "304 bytes; file names are limited to 255: rename the file"),
])
def test_upload_names_that_cannot_be_file_names_get_400(client, filename, words):
    body, headers = multipart(filename, encoded(np.zeros((40, 40, 3), np.uint8)))
    response = client.post(UPLOAD, content=body, headers=headers)
    assert response.status_code == 400 and words in response.json()["detail"]


@pytest.mark.parametrize("filename, label, query_class", [
    ("s1_query.png", "s1_query.png", "s1"),
    ("../../../etc/s1_x.png", "s1_x.png", "s1"),
    ("C:\\Users\\me\\s0_y.tif", "s0_y.tif", "s0"),
    ("notes_s1.png", "notes_s1.png", None),
    ("s1.png", "s1.png", None),
])
def test_the_file_name_is_a_label_and_only_its_class_prefix_is_kept(client, service, served_index, monkeypatch,
                                                                      filename, label, query_class):
    searched = []
    run_queries = search_service.run_queries

    def recording(index, jobs, *args, **kwargs):
        searched.extend(jobs)
        return run_queries(index, jobs, *args, **kwargs)

    monkeypatch.setattr(search_service, "run_queries", recording)
    data = (served_index["root"] / "patches" / "s1" / "s1_0.png").read_bytes()
    response = client.post(UPLOAD, files={"file": (filename, data, "image/png")})
    assert response.status_code == 200, response.text
    assert (response.json()["name"], response.json()["query_class"]) == (label, query_class)
    [job] = searched  # the upload's crop, searched in memory under its label: no file is written or read
    crop = service.index.settings.crop_size
    assert (job.kind, job.path, job.files, job.pixels.shape) == ("pixels", label, (), (crop, crop, 3))


@pytest.mark.parametrize("url, name", [
    ("/api/patches/9223372036854775808/image.jpeg", "patch_id"),
    ("/api/slides/9223372036854775808", "slide_id"),
    ("/api/slides/9223372036854775808/image.dzi", "slide_id"),
    ("/api/slides/9223372036854775808/thumbnail.jpeg", "slide_id"),
    ("/api/slides/99999999999999999999999/image_files/1/0_0.jpeg", "slide_id"),
])
def test_ids_past_sqlites_range_get_422(client, url, name):
    response = client.get(url)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert (error["loc"], error["msg"]) == (["path", name], "Input should be less than or equal to 9223372036854775807")


def test_a_region_on_a_slide_id_past_sqlites_range_gets_422(client):
    response = client.post(REGION, json={**region_of(client), "slide_id": 2**63})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "slide_id"]


# ----------------------------------------------------------------------------- 9: hosts
@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "testserver"])
def test_this_machines_names_are_answered(client, host):
    assert client.get("/api/slides", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""])
def test_other_hosts_are_refused(client, host):
    response = client.get("/api/slides", headers={"Host": host})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith(f"Host {host!r}: not a name this server answers to (127.0.0.1, ::1, localhost, "
                             "testserver)") and "--allowed-hosts" in detail
    assert "slide_000" not in response.text


def test_serve_answers_its_host_and_allowed_hosts_only(served_index, monkeypatch):
    import uvicorn

    if not server.viewer_installed():
        pytest.skip(f"the page's viewer is not installed: {server.VIEWER_INSTALL}")
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    args = retrieve.get_args_parser().parse_args(["serve", "--index", str(served_index["index"]), "--device", "cpu",
                                                  "--host", "10.1.2.3", "--allowed-hosts",
                                                  "search.example.org,Proxy.Example.net"])
    assert retrieve.main(args) == 0
    assert started["server_header"] is False and started["host"] == "10.1.2.3"
    with TestClient(started["app"], base_url="http://search.example.org") as browser:
        for host, status in [("search.example.org", 200), ("proxy.example.net:443", 200), ("10.1.2.3:8000", 200),
                             ("localhost", 200), ("evil.example", 400)]:  # the page: the service is closed by now
            assert browser.get("/", headers={"Host": host}).status_code == status, host


def test_allowed_hosts_must_be_bare_names(capsys):
    with pytest.raises(SystemExit):
        retrieve.get_args_parser().parse_args(["serve", "--index", "x", "--allowed-hosts", "https://a.example"])
    assert "'https://a.example': expected host names or addresses without a scheme or port" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 10: origins and headers
@pytest.mark.parametrize("origin", ["http://evil.example", "http://testserver:8080", "https://testserver", "null"])
def test_posts_from_another_origin_get_403(client, origin):
    for url, send in [(REGION, {"json": region_of(client)}),
                      (UPLOAD, {"files": {"file": ("s1_q.png", encoded(np.zeros((40, 40, 3), np.uint8)))}})]:
        response = client.post(url, headers={"Origin": origin}, **send)
        assert response.status_code == 403
        assert response.json()["detail"] == (f"Origin {origin}: a page of another site may not send requests here; "
                                             "use the search page itself, http://testserver/")


def test_posts_from_the_page_itself_are_answered(client):
    for origin in ("http://testserver", "http://testserver:80"):
        assert client.post(REGION, json=region_of(client), headers={"Origin": origin}).status_code == 200
    assert client.get("/api/index", headers={"Origin": "http://evil.example"}).status_code == 200  # reads only


@pytest.mark.parametrize("url", ["/", "/api/index", "/static/app.js", "/api/slides/999", "/api/no/such/route"])
def test_every_response_has_the_security_headers(client, url):
    headers = client.get(url).headers
    assert headers["x-content-type-options"] == "nosniff"
    policy = headers["content-security-policy"]
    assert policy == server.PAGE_POLICY
    assert "default-src 'self'" in policy and "script-src 'self';" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy and "http" not in policy


def test_the_api_docs_have_their_own_policy(client):
    response = client.get("/docs")
    assert response.status_code == 200 and server.DOCS_CDN in response.text
    policy = response.headers["content-security-policy"]
    assert server.DOCS_CDN in policy and "frame-ancestors 'none'" in policy


# ----------------------------------------------------------------------------- 11: no path in an error
@pytest.fixture
def moved_slide_index(served_index, tmp_path) -> dict:
    """An index of one slide in tmp_path, whose slide file is then renamed."""
    slide = tmp_path / "private folder" / "slide_000.tif"
    slide.parent.mkdir()
    shutil.copy(served_index["slides"][0], slide)
    argv = ["index", str(served_index["checkpoint"]), str(slide), "--index", str(tmp_path / "index"), "--mpp", "1.0",
            "--device", "cpu", "--workers", "0", "--batch-size", "16"]
    assert retrieve.main(retrieve.get_args_parser().parse_args(argv)) == 0
    service = SearchService.open(str(tmp_path / "index"), "cpu", batch_size=16)
    slide.rename(slide.with_suffix(".moved"))
    yield {"service": service, "slide": slide}
    service.close()


def test_errors_name_a_missing_slide_by_its_id_and_file_name_only(moved_slide_index):
    service, slide = moved_slide_index["service"], moved_slide_index["slide"]
    [source_id] = service.sources()
    patch_id = int(service.index.patch_ids(source_id)[0])
    with TestClient(server.create_app(service, allowed_hosts=["testserver"])) as client:
        for url in (f"/api/slides/{source_id}/image.dzi", f"/api/slides/{source_id}/image_files/10/0_0.jpeg",
                    f"/api/patches/{patch_id}/image.jpeg"):
            response = client.get(url)
            assert response.status_code == 404, url
            detail = response.json()["detail"]
            assert str(slide.parent) not in detail and "private folder" not in detail, detail
            assert "/" not in detail.replace("/api/", ""), detail
            assert re.match(rf"(slide {source_id}|patch {patch_id}): ", detail), detail
        assert "slide_000.tif" in client.get(f"/api/slides/{source_id}/image.dzi").json()["detail"]


def test_paths_are_cut_to_their_last_part_in_any_message():
    message = ("q.png: cannot be searched with (cannot identify image file '/tmp/upload-x1/query.png'); "
               "C:\\Users\\me\\s.svs; /home/me/my slides/a b.svs; /api/slides lists them")
    assert search_service.without_paths(message, ["/home/me/my slides/a b.svs"]) == (
        "q.png: cannot be searched with (cannot identify image file 'query.png'); s.svs; a b.svs; "
        "/api/slides lists them")


# ----------------------------------------------------------------------------- a real server, over a socket
def memory_kb(pid: int) -> int:
    """The process's resident memory now (VmRSS), in kB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


class PeakMemory:
    """The most resident memory a process reaches while the block runs, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.running = pid, memory_kb(pid), True

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, memory_kb(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> PeakMemory:
        self.before = memory_kb(self.pid)
        self.thread = threading.Thread(target=self.sample)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.2)
        self.running = False
        self.thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.before) / 1024


@pytest.fixture(scope="module")
def live(live_server):
    return live_server


def send_chunked(port: int, path: str, total: int) -> tuple[bytes, int]:
    """POST `total` bytes in chunks, declaring Content-Length: 100 as well; stops sending as soon as
    an answer arrives. (the answer, bytes sent by then)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 100\r\n"
                     "Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n\r\n"
                     .encode())
        head, _ = multipart(b"big.png", b"")
        head = head[:head.index(b"\r\n\r\n") + 4]
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        sent, piece = 0, b"%x\r\n" % CHUNK + b"\0" * CHUNK + b"\r\n"
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(piece)
                sent += CHUNK
            if sent >= total:
                sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server closed the connection after answering
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer, sent


@pytest.mark.slow
@pytest.mark.parametrize("path, words", [(UPLOAD, b"uploads are limited to 20 MB"),
                                         (REGION, b"takes at most 4,096 bytes")])
def test_a_real_server_stops_reading_a_chunked_body_past_the_limit(live, path, words):
    total = 30 * 2**20
    with PeakMemory(live["pid"]) as memory:
        answer, sent = send_chunked(live["port"], path, total)
    assert answer.startswith(b"HTTP/1.1 413 ") and words in answer, answer[:300]
    assert sent < total  # answered before the whole body was sent
    assert memory.growth_mb < 40, memory.growth_mb
    assert b"\r\nserver:" not in answer.lower() and b"content-security-policy: default-src 'self'" in answer


@pytest.mark.slow
def test_a_real_server_refuses_many_pixel_pngs_without_decoding_them(live):
    data = blank_png(6000, 6000)
    body, headers = multipart(b"wide.png", data)
    answers: list[tuple[int, str]] = []

    def post() -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{live['port']}{UPLOAD}", data=body, headers=headers)
        try:
            urllib.request.urlopen(request, timeout=60)
            answers.append((200, ""))
        except urllib.error.HTTPError as error:
            answers.append((error.code, json.loads(error.read())["detail"]))

    with PeakMemory(live["pid"]) as memory:
        for _ in range(2):
            threads = [threading.Thread(target=post) for _ in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    assert answers == [(413, "wide.png: 6000 x 6000 pixels; uploads are limited to 4096 x 4096 pixels (a patch at "
                             "the index's scale is enough)")] * 6
    assert memory.growth_mb < 150, memory.growth_mb
