"""The web app driven in a real headless Chromium (Debian's chromium + chromium-driver, through selenium).

Browse, open a detail, search by text, review a rejected item, flip it to
good, mark a gallery image bad; a screenshot of each page goes to the test's
tmp dir and, when ``GALLERY_WEB_SCREENSHOTS`` is set, to that folder too. The
gallery is filled through a real serve loop; the model directory is
``models.tiny_onnx``'s (no torch), whose tiny text tower makes text search
real: each entry's stored features are the text features of its own caption,
so a caption typed in the search box must bring its entry first.
"""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests import gallery_helpers as T
from tests.test_gallery_web import Gallery

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# Under CI a missing browser is a failure, not a skip (as in tests/test_gallery_page.py).
needs_browser = pytest.mark.skipif(
    (CHROMIUM is None or CHROMEDRIVER is None) and not os.environ.get("CI"),
    reason="Debian's chromium and chromium-driver are not installed: sudo apt-get install chromium chromium-driver",
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600), needs_browser]

CAPTIONS = ["a mountain lake at sunset", "a red car on a country road", "an old building in the town square",
            "a bird on a branch", "a sandy beach with palm trees"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models import tiny_onnx

    out = tmp_path_factory.mktemp("web_models")
    tiny_onnx.build(out)
    return out


@pytest.fixture
def site(tmp_path: Path, models: Path) -> Iterator[dict[str, Any]]:
    """A gallery of captioned photos with CLIP features, two review items, and the web app on a free port."""
    from waitress import create_server

    from anti_sus.text.encoder import TextEncoder
    from gallery_bridge.web import WebConfig, create_app

    feats = TextEncoder.from_dir(models).encode(CAPTIONS)
    g = Gallery(tmp_path / "gallery")
    ids = {}
    for i, caption in enumerate(CAPTIONS):
        meta = {"title": caption, "author": f"author{i}", "source": "reddit", "licence": "CC BY 4.0",
                "permalink": f"https://www.reddit.com/r/pics/comments/p{i}/", "scores": {"gmm": -10.0 - i, "watermark": 0.02}}
        reply = g.client.ingest(f"test:{i}", meta, T.encode(T.photo(200 + i, (640, 480))), features=feats[i])
        assert reply.status == "added"
        ids[caption] = g._entry_of(f"test:{i}")
    reviews = [g.add_review(i, title=f"rejected photo {i}") for i in range(2)]
    app = create_app(WebConfig(gallery=g.root, connect=g.endpoint, models=models, timeout=30))
    server = create_server(app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.effective_port}", "ids": ids, "reviews": reviews, "gallery": g}
    finally:
        server.close()
        thread.join(10)
        g.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver is named explicitly, so selenium never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or "chromedriver"), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def shoot(driver: Any, tmp_path: Path, name: str) -> None:
    """A screenshot of the page, in the test's tmp dir and in $GALLERY_WEB_SCREENSHOTS when set."""
    path = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.stat().st_size > 5000, name
    extra = os.environ.get("GALLERY_WEB_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / path.name)


def wait_for(driver: Any, condition: Any, what: str, timeout: float = 30) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, message=what)


def images_loaded(driver: Any) -> int:
    """How many <img> on the page decoded to a real picture (not a broken-image box)."""
    return int(driver.execute_script(
        "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 16).length"))


def no_console_errors(driver: Any) -> None:
    """No script error and no CSP violation was logged by the page."""
    errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, errors


def test_browse_detail_search_review_and_label_in_chromium(site: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    try:
        _walk(site, browser, tmp_path)
    except BaseException:
        # What the browser showed when it went wrong: a screenshot, the page and its console.
        shoot(browser, tmp_path, "failure")
        (tmp_path / "failure.html").write_text(browser.page_source, encoding="utf-8")
        print("failed at", browser.current_url, "console:", browser.get_log("browser"))
        raise


def _walk(site: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, ids = site["url"], site["ids"]
    d = browser

    # Browse: every image, newest first, thumbnails decoded.
    d.get(url + "/")
    cards = d.find_elements(By.CSS_SELECTOR, ".grid .card")
    assert [c.get_attribute("data-item") for c in cards] == [f"g{ids[c]}" for c in reversed(CAPTIONS)]
    wait_for(d, lambda drv: images_loaded(drv) >= len(CAPTIONS), "thumbnails to load")
    shoot(d, tmp_path, "1-browse")
    no_console_errors(d)

    # Detail: the full image, every score, source, author, licence, original URL.
    d.find_element(By.LINK_TEXT, CAPTIONS[0]).click()
    wait_for(d, lambda drv: drv.find_element(By.ID, "title").text == CAPTIONS[0], "the detail page")
    assert d.current_url.endswith(f"/items/g{ids[CAPTIONS[0]]}")
    scores = d.find_element(By.ID, "scores").text
    assert "gmm" in scores and "-10" in scores and "watermark" in scores
    assert d.find_element(By.ID, "author").text == "author0" and d.find_element(By.ID, "licence").text == "CC BY 4.0"
    assert d.find_element(By.ID, "permalink").get_attribute("href") == "https://www.reddit.com/r/pics/comments/p0/"
    wait_for(d, lambda drv: drv.execute_script("return document.querySelector('img.full').naturalWidth") == 640,
             "the full image")
    shoot(d, tmp_path, "2-detail")
    no_console_errors(d)

    # Search by text: the caption's own entry comes first.
    box = d.find_element(By.ID, "q")
    box.send_keys(CAPTIONS[3], Keys.ENTER)
    wait_for(d, lambda drv: drv.find_elements(By.CSS_SELECTOR, "#results .card"), "search results")
    first = d.find_elements(By.CSS_SELECTOR, "#results .card")[0]
    assert first.get_attribute("data-item") == f"g{ids[CAPTIONS[3]]}", d.find_element(By.ID, "results").text
    shoot(d, tmp_path, "3-search")
    no_console_errors(d)

    # By example: "more like this" on a detail page puts the image itself first; an uploaded file gets results.
    d.get(f"{url}/items/g{ids[CAPTIONS[2]]}")
    d.find_element(By.ID, "more-like").click()
    wait_for(d, lambda drv: drv.find_elements(By.CSS_SELECTOR, "#results .card"), "more-like-this results")
    assert d.find_elements(By.CSS_SELECTOR, "#results .card")[0].get_attribute("data-item") == f"g{ids[CAPTIONS[2]]}"
    upload = tmp_path / "query.jpg"
    upload.write_bytes(T.encode(T.photo(200, (640, 480))))
    d.find_element(By.ID, "upload").send_keys(str(upload))
    d.find_element(By.CSS_SELECTOR, "form.upload button").click()
    wait_for(d, lambda drv: drv.find_elements(By.CSS_SELECTOR, "#results .card"), "results for the uploaded file")
    assert len(d.find_elements(By.CSS_SELECTOR, "#results .card")) == len(CAPTIONS)
    shoot(d, tmp_path, "3b-search-upload")
    no_console_errors(d)

    # Review: the rejected items, newest first; keyboard j then g flips the first one to good.
    d.find_element(By.ID, "nav-review").click()
    wait_for(d, lambda drv: drv.find_elements(By.CSS_SELECTOR, "#review-items .card"), "the review page")
    items = d.find_elements(By.CSS_SELECTOR, "#review-items .card")
    newest = f"r{site['reviews'][-1]}"
    assert [c.get_attribute("data-item") for c in items] == [f"r{r}" for r in reversed(site["reviews"])]
    assert "rejected by gmm" in items[0].text
    wait_for(d, lambda drv: images_loaded(drv) >= 2, "review images to load")
    shoot(d, tmp_path, "4-review")
    d.find_element(By.TAG_NAME, "body").send_keys("j")
    assert "selected" in d.find_element(By.ID, newest).get_attribute("class")
    d.switch_to.active_element.send_keys("g")
    state = wait_for(d, lambda drv: "added to the gallery" in drv.find_element(By.ID, newest).text
                     and drv.find_element(By.ID, newest), "the review item to be labelled good")
    assert "labelled good" in state.text
    shoot(d, tmp_path, "5-review-labelled")
    no_console_errors(d)

    # The flipped item is now in the gallery (newest), under its review title.
    d.get(url + "/")
    titles = [c.text for c in d.find_elements(By.CSS_SELECTOR, ".grid .card .title")]
    assert len(titles) == len(CAPTIONS) + 1 and titles[0] == "rejected photo 1", titles

    # Mark a gallery image bad on its detail page: it leaves the gallery.
    bad = ids[CAPTIONS[1]]
    d.get(f"{url}/items/g{bad}")
    d.find_element(By.CSS_SELECTOR, "button.label.bad").click()
    wait_for(d, lambda drv: "removed from the gallery" in drv.find_element(By.ID, "state").text, "the image to be removed")
    shoot(d, tmp_path, "6-marked-bad")
    no_console_errors(d)
    d.get(url + "/")
    items = [c.get_attribute("data-item") for c in d.find_elements(By.CSS_SELECTOR, ".grid .card")]
    assert f"g{bad}" not in items and len(items) == len(CAPTIONS)
    shoot(d, tmp_path, "7-browse-after")
    for name in ("1-browse", "2-detail", "3-search", "3b-search-upload", "4-review", "5-review-labelled", "6-marked-bad", "7-browse-after"):
        assert (tmp_path / f"{name}.png").is_file()
