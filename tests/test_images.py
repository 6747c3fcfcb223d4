"""histo_retrieval.images: what an undecodable image raises, and the report of the ones left out."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from histo_retrieval import images


def test_unreadable_covers_what_pillow_raises_for_broken_files(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    foreign = tmp_path / "foreign.png"
    foreign.write_text("not an image")
    for path in (truncated, foreign):
        with pytest.raises(images.UNREADABLE):
            images.load_rgb(path)
    assert images.load_rgb(good).getpixel((0, 0)) == (200, 10, 10)
    assert issubclass(Image.DecompressionBombError, images.UNREADABLE)


def test_report_unreadable_lists_each_file_once(capsys) -> None:
    images.report_unreadable([("b.png", "broken"), ("a.png", "truncated"), ("b.png", "broken")])
    assert capsys.readouterr().err == "2 unreadable image(s) were left out:\n  a.png (truncated)\n  b.png (broken)\n"
