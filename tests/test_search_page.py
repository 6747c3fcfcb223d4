"""The search page as a person uses it: `retrieve.py serve` on a free loopback port, driven in
Debian's Chromium through Playwright (the system browser; nothing is downloaded). Each step leaves
a screenshot in the test's temporary folder.

Without Chromium, Playwright or the viewer's npm packages these tests are skipped, with the reason
in pytest's summary; `.ci/run` installs all three.
"""
from __future__ import annotations

import io
import shutil
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from histo_retrieval.search.app import VIEWER_INSTALL, viewer_installed

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The flags a closed network needs: no background connections, no first-run work, no sandbox as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - reported as a skip
    sync_playwright = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: install Debian's chromium package "
                                                "(apt-get install -y chromium; .ci/run does so as root)"),
    pytest.mark.skipif(sync_playwright is None, reason="Playwright is not installed: pip install -r requirements.txt"),
    pytest.mark.skipif(not viewer_installed(), reason=f"the page's viewer is not installed: {VIEWER_INSTALL}"),
]


@pytest.fixture(scope="module")
def base_url(live_server):
    return live_server["url"]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, base_url, tmp_path):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, base_url=base_url)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    opened.shots = tmp_path  # where each step's screenshot goes
    yield opened
    context.close()
    if getattr(opened, "expects_refusals", False):  # the browser logs each 4xx answer as an error
        errors = [e for e in errors if not e.startswith("Failed to load resource")]
    assert not errors, f"the page reported errors: {errors}"


def viewer_loaded(page) -> None:
    page.wait_for_function("() => state.viewer && state.viewer.world.getItemCount() > 0 "
                           "&& state.viewer.world.getItemAt(0).getFullyLoaded()", timeout=30_000)


def cut_patch(served_index, tmp_path: Path) -> tuple[dict, Path]:
    """An indexed patch of the second slide, cut as the index cut it, saved as a PNG."""
    from histo_retrieval.search.service import SearchService
    from histo_retrieval.search.queries import patch_pixels

    service = SearchService.open(str(served_index["index"]), "cpu")
    try:
        source = next(row for row in service.sources().values() if row.path == served_index["slides"][1])
        patch = service.patch(int(service.index.patch_ids(source.id)[10]))
        path = tmp_path / "cut_from_slide_001.png"
        Image.fromarray(patch_pixels(service.index, patch)).save(path)
    finally:
        service.close()
    return {"id": patch.id, "source_id": patch.source_id, "x": patch.x, "y": patch.y, "width": patch.width,
            "height": patch.height}, path


def test_the_home_page_lists_the_slides(page):
    page.goto("/")
    expect(page.locator("#slide-list li a")).to_have_count(3)
    expect(page.locator("#summary")).to_contain_text("3 slide(s)")
    expect(page.locator("#folders")).to_contain_text("1 folder(s)")
    assert page.locator("#slide-list li a").all_inner_texts()[0].startswith("slide_000.tif")
    page.wait_for_function("() => [...document.querySelectorAll('#slide-list img')].every(i => i.naturalWidth > 0)")
    page.fill("#filter", "002")
    expect(page.locator("#slide-list li a")).to_have_count(1)
    expect(page.locator("#slide-list li a")).to_contain_text("slide_002.tif")
    page.screenshot(path=page.shots / "1_home.png")


def test_an_uploaded_patch_finds_its_place_and_opens_it(page, served_index, tmp_path):
    patch, path = cut_patch(served_index, tmp_path)
    page.goto("/")
    expect(page.locator("#slide-list li a")).to_have_count(3)
    page.set_input_files("#file", str(path))
    first = page.locator("#matches .match").first
    expect(first).to_have_attribute("data-patch", str(patch["id"]), timeout=30_000)
    expect(first).to_contain_text("#1 · 1.000")
    expect(first).to_contain_text("slide_001.tif")
    expect(first).to_contain_text(f"{patch['x']:,}, {patch['y']:,}")
    expect(page.locator("#ranking tbody tr").first).to_contain_text("slide_001.tif")
    page.screenshot(path=page.shots / "2_upload_results.png", full_page=True)

    first.click()
    expect(page.locator("#slide-name")).to_have_text("slide_001.tif")
    box = f"{patch['x']},{patch['y']},{patch['width']},{patch['height']}"
    assert page.evaluate("location.hash") == f"#/slide/{patch['source_id']}/{box}"
    viewer_loaded(page)
    outlined = page.locator(f".match-box[data-patch='{patch['id']}']")
    expect(outlined).to_have_count(1)
    centre = page.evaluate("() => state.viewer.viewport.viewportToImageCoordinates("
                           "state.viewer.viewport.getCenter(true))")
    assert abs(centre["x"] - (patch["x"] + patch["width"] / 2)) < patch["width"]
    assert abs(centre["y"] - (patch["y"] + patch["height"] / 2)) < patch["height"]
    on_screen, viewer_box = outlined.bounding_box(), page.locator("#viewer").bounding_box()
    assert viewer_box["x"] <= on_screen["x"] and on_screen["x"] + on_screen["width"] <= viewer_box["x"] + viewer_box["width"]

    page.check("#heat")
    page.wait_for_function("() => state.viewer.world.getItemCount() === 2")
    expect(page.locator("#heat-legend")).to_contain_text("bright 1.000")
    page.screenshot(path=page.shots / "3_match_on_slide_with_heat.png")


def test_a_region_drawn_in_the_viewer_is_searched(page):
    page.goto("/#/slide/1")
    viewer_loaded(page)
    page.click("#draw")
    canvas = page.locator("#viewer .openseadragon-canvas").first.bounding_box()
    start = (canvas["x"] + canvas["width"] * 0.40, canvas["y"] + canvas["height"] * 0.35)
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(start[0] + 40, start[1] + 30, steps=4)
    page.mouse.move(start[0] + 90, start[1] + 70, steps=4)
    page.mouse.up()
    expect(page.locator("#search-region")).to_be_enabled()
    region = page.evaluate("() => state.region")
    assert region["width"] > 0 and region["height"] > 0
    expect(page.locator("#region-text")).to_contain_text(f"region {region['x']}, {region['y']}")
    page.click("#search-region")
    expect(page.locator("#status")).to_contain_text("match(es) for slide_000.tif @", timeout=30_000)
    assert page.locator("#matches .match").count() > 0
    assert page.locator(".query-box").count() >= 1
    search = page.evaluate("() => state.search")
    assert search["kind"] == "region" and search["source_id"] == 1
    for x, y, width, height in search["query_boxes"]:  # the query patches cover the region drawn
        assert region["x"] - width < x <= region["x"] + region["width"]
        assert region["y"] - height < y <= region["y"] + region["height"]
    page.screenshot(path=page.shots / "4_region_results.png", full_page=True)


def test_find_similar_slides_lists_the_others_ranked_and_opens_them(page, base_url):
    import json
    page.goto("/#/slide/1")
    viewer_loaded(page)
    page.click("#similar")
    items = page.locator("#similar-list li")
    expect(items).to_have_count(2, timeout=30_000)  # the two other slides, never the open one
    expected = json.loads(urllib.request.urlopen(base_url + "/api/slides/1/similar").read())["slides"]
    for item, slide in zip(items.all(), expected):
        assert item.get_attribute("data-slide") == str(slide["id"])
        expect(item).to_contain_text(f"#{slide['rank']} · {slide['score']:.3f}")
        expect(item).to_contain_text(slide["name"])
    assert "slide_000.tif" not in " ".join(items.all_inner_texts())
    expect(page.locator("#similar-title")).to_have_text("Slides like slide_000.tif")
    page.wait_for_function("() => [...document.querySelectorAll('#similar-list img')].every(i => i.naturalWidth > 0)")
    page.screenshot(path=page.shots / "5_similar_slides.png", full_page=True)
    items.first.locator("a").click()
    expect(page.locator("#slide-name")).to_have_text(expected[0]["name"])
    assert page.evaluate("location.hash") == f"#/slide/{expected[0]['id']}"
    expect(page.locator("#similar-section")).to_be_hidden()


def test_a_bad_upload_says_why_on_the_page(page, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not pixels")
    page.expects_refusals = True
    page.goto("/")
    page.set_input_files("#file", str(text))
    expect(page.locator("#status")).to_contain_text("notes.txt: not a PNG, JPEG or TIFF image")
    expect(page.locator("#status")).to_have_class("error")


def test_the_served_page_needs_no_internet(base_url):
    html = urllib.request.urlopen(base_url + "/").read().decode()
    assert "http://" not in html and "https://" not in html  # every script and style comes from this server
    viewer = urllib.request.urlopen(base_url + "/vendor/openseadragon/openseadragon.min.js").read()
    assert len(viewer) > 100_000
    icon = urllib.request.urlopen(base_url + "/vendor/openseadragon/images/zoomin_rest.png").read()
    assert Image.open(io.BytesIO(icon)).size[0] > 0


@pytest.fixture
def records_page(browser, records_server, tmp_path):
    """A page on the server of 250 slide records, with the /api/slides requests it made (their query
    parameters) and the errors it reported."""
    from urllib.parse import parse_qs, urlsplit

    context = browser.new_context(viewport={"width": 1400, "height": 1000}, base_url=records_server["url"])
    opened = context.new_page()
    opened.errors, opened.listings = [], []
    opened.on("pageerror", lambda error: opened.errors.append(str(error)))
    opened.on("console", lambda message: opened.errors.append(message.text) if message.type == "error" else None)
    opened.on("request", lambda request: opened.listings.append(parse_qs(urlsplit(request.url).query))
              if urlsplit(request.url).path == "/api/slides" else None)
    opened.shots = tmp_path
    yield opened
    context.close()


def listed_names(page) -> list[str]:
    return [text.split("\n")[0] for text in page.locator("#slide-list li a").all_inner_texts()]


def test_the_slide_list_loads_a_page_more_as_one_scrolls(records_page):
    page = records_page
    page.goto("/")
    expect(page.locator("#slide-list li a")).to_have_count(100)
    expect(page.locator("#slide-count")).to_have_text("100 of 250 slide(s)")
    assert listed_names(page) == [f"slide_{i:06d}.svs" for i in range(100)]
    page.locator("#more").scroll_into_view_if_needed()
    expect(page.locator("#slide-list li a")).to_have_count(200)
    page.locator("#more").scroll_into_view_if_needed()
    expect(page.locator("#slide-list li a")).to_have_count(250)
    expect(page.locator("#slide-count")).to_have_text("250 of 250 slide(s)")
    expect(page.locator("#more")).to_be_hidden()
    assert listed_names(page) == [f"slide_{i:06d}.svs" for i in range(250)]  # each once, in order
    assert [(q["offset"], q["limit"]) for q in page.listings if q["kind"] == ["slide"]] == \
        [(["0"], ["100"]), (["100"], ["100"]), (["200"], ["100"])]
    page.screenshot(path=page.shots / "6_scrolled_list.png")
    assert not page.errors, page.errors


def test_the_name_search_asks_the_server(records_page):
    page = records_page
    page.goto("/")
    expect(page.locator("#slide-list li a")).to_have_count(100)
    # Typed key by key; slides 230 to 239: none of them among the 100 the page has read.
    page.locator("#filter").press_sequentially("slide_00023", delay=30)
    expect(page.locator("#slide-list li a")).to_have_count(10)
    assert listed_names(page) == [f"slide_{i:06d}.svs" for i in range(230, 240)]
    expect(page.locator("#slide-count")).to_have_text("10 of 10 slide(s) matching “slide_00023”")
    assert page.listings[-1]["q"] == ["slide_00023"] and page.listings[-1]["offset"] == ["0"]
    page.fill("#filter", "no such slide")
    expect(page.locator("#slide-list li")).to_have_text(["No slide matches."])
    page.fill("#filter", "")
    expect(page.locator("#slide-list li a")).to_have_count(100)
    # One request a pause in typing, not one a key: three after the first page.
    assert len([q for q in page.listings if q["kind"] == ["slide"]]) == 4
    assert not page.errors, page.errors


def test_a_link_to_a_slide_not_yet_listed_opens_it(records_page):
    page = records_page
    page.goto("/#/slide/240")  # the 240th record: not on the list's first page
    expect(page.locator("#slide-name")).to_have_text("slide_000239.svs")
    expect(page.locator("#slide-list li a")).to_have_count(100)
    # Records only: the slide's file does not exist, so the viewer says it could not be opened.
    expect(page.locator("#status")).to_contain_text("could not be opened")
