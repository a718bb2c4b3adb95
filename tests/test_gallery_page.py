"""index.html in headless Chromium: it loads, shows the thumbnails, and has no broken links."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from tests import gallery_helpers as T
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.ingest import Ingester
from gallery_bridge.targets.folder import FolderTarget
from gallery_bridge.validate import Limits, Meta, check_image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Under CI a missing browser is a failure, not a skip: `make test` installs it (tools/ensure-chromium.sh).
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="Debian's chromium is not installed: sudo apt-get install chromium chromium-driver",
)


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    assert CHROMIUM, "chromium is not on PATH (make test installs it as root: tools/ensure-chromium.sh)"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
           "--disable-component-update", "--disable-sync", "--disable-extensions", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'profile'}", "--window-size=1400,1000", "--force-device-scale-factor=1",
           "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.local: list[str] = []
        self.external: list[str] = []
        self.figures = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "figure":
            self.figures += 1
        for name, value in attrs:
            if name in ("src", "href") and value:
                (self.external if urlparse(value).scheme in ("http", "https") else self.local).append(value)


def _gallery(root: Path, n: int) -> tuple[Ingester, list[int]]:
    target = FolderTarget(root, page_limit=3)
    ing = Ingester(Catalogue(target.catalogue_path), target)
    ids = []
    for i in range(n):
        meta = Meta(title=f"photo {i} <b>bold</b>", permalink=f"https://www.reddit.com/r/pics/comments/{i}/",
                    subreddit="pics", scores={"gmm": -10.0 - i})
        fmt = ("JPEG", "PNG", "WEBP")[i % 3]
        out = ing.ingest(f"k{i}", meta, check_image(T.encode(T.photo(60 + i, (1000, 700)), fmt), Limits()))
        assert out.status == "added"
        ids.append(out.gallery_id)
    return ing, ids


def test_page_structure_without_a_browser(tmp_path: Path) -> None:
    ing, ids = _gallery(tmp_path / "g", 4)
    html = (tmp_path / "g" / "index.html").read_text()
    links = _Links()
    links.feed(html)
    assert links.figures == 3  # page_limit=3: the newest three
    assert "newest 3 of 4" in html
    order = [int(m) for m in re.findall(r'<figure id="e(\d+)"', html)]
    assert order == sorted(ids, reverse=True)[:3]  # newest first
    for ref in links.local:
        assert (tmp_path / "g" / unquote(ref)).is_file(), ref
    assert "<b>" not in html and "&lt;b&gt;" in html and "gmm -13" in html
    ing.close()


@pytest.mark.e2e  # a real browser: slow, left out of `make test-fast`
@needs_chromium
def test_page_in_headless_chromium(tmp_path: Path) -> None:
    root = tmp_path / "g"
    ing, ids = _gallery(root, 3)
    ing.close()
    url = (root / "index.html").resolve().as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    links = _Links()
    links.feed(dom.stdout)
    assert links.figures == 3
    srcs = [v for v in links.local if v.startswith("thumbs/")]
    assert sorted(srcs) == sorted(f"thumbs/{i}.jpg" for i in ids)
    for ref in links.local:
        assert (root / unquote(ref)).is_file(), f"broken link {ref}"
    assert all(x.startswith("https://www.reddit.com/") for x in links.external)
    shot = tmp_path / "shot.png"
    res = _chromium([f"--screenshot={shot}", url], tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"), dtype=np.int16)
    # Page background is #111; three 180 px high thumbnails must cover far more
    # than any alt text or broken-image icon would.
    differs = (np.abs(px - np.array([17, 17, 17])).sum(axis=2) > 60).sum()
    assert differs > 3 * 180 * 200 * 0.8, f"thumbnails not rendered ({differs} non-background pixels)"
    # Each thumbnail's colours appear in the screenshot (the images decoded, not just boxes).
    for gid in ids:
        with Image.open(root / "thumbs" / f"{gid}.jpg") as th:
            mean = np.asarray(th.convert("RGB").resize((1, 1), Image.Resampling.BOX)).reshape(3).astype(np.int16)
        assert (np.abs(px - mean).sum(axis=2) < 30).sum() > 500, f"thumbnail {gid} not visible"
