"""Labels given over HTTP: the web app's JSON API (waitress on 127.0.0.1) -> serve's label op -> labels export -> anti-sus tune.

Everything is a real server: ``gallery-bridge serve``'s loop on a thread with its
ZeroMQ socket on 127.0.0.1, and the web app under waitress on another port,
driven with an ordinary HTTP client that logs in the way the page does (session
cookie + the CSRF token from the page).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests

from gallery_bridge.cli import main as gb_main
from tests.test_gallery_labels import DIM, REPO, Gallery, feats, jpeg, onnx_models  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(600)


class Web:
    """The web app under waitress on 127.0.0.1 (a free port), on a thread; ``close`` stops and joins it."""

    def __init__(self, gallery: Gallery) -> None:
        from waitress import create_server

        from gallery_bridge.web import WebConfig, create_app

        app = create_app(WebConfig(gallery=gallery.root, connect=gallery.server.endpoint, timeout=30))
        self.server = create_server(app, host="127.0.0.1", port=0, threads=2)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)
        self.thread.start()
        self.http = requests.Session()
        page = self.http.get(self.url + "/", timeout=30)
        m = re.search(r'<meta name="csrf-token" content="([^"]+)"', page.text)
        assert page.status_code == 200 and m, "the page carries no CSRF token"
        self.csrf = m.group(1)

    def label(self, item: str, value: str) -> requests.Response:
        return self.http.post(f"{self.url}/api/items/{item}/label", json={"label": value},
                              headers={"X-CSRF-Token": self.csrf}, timeout=60)

    def close(self) -> None:
        self.http.close()
        self.server.close()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Gallery, Web]]:
    g = Gallery(tmp_path / "gallery")
    try:
        web = Web(g)
        try:
            yield g, web
        finally:
            web.close()
    finally:
        g.stop()


def test_labels_given_through_the_web_api_export_for_anti_sus_tune(stack, tmp_path: Path, onnx_models: Path) -> None:
    g, web = stack
    c = g.client
    rev = [c.review(f"rev:{i}", {"title": f"rejected {i}"}, jpeg(90 + i), {"gmm": -50.0}, "gmm", feats(90 + i))["review_id"]
           for i in range(3)]
    ids = [c.ingest(f"site:{i}", {"title": f"kept {i}"}, jpeg(95 + i), feats(95 + i)).gallery_id for i in range(3)]
    # The review page lists what anti_sus rejected.
    listed = web.http.get(f"{web.url}/api/review?limit=10", timeout=30).json()
    assert listed["total"] == 3 and sorted(i["id"] for i in listed["items"]) == sorted(rev)

    r = web.label(f"r{rev[0]}", "good")  # flip a rejected one: it enters the gallery
    assert r.status_code == 200 and r.json()["ingest"] == "added", r.text
    flipped = r.json()["gallery_id"]
    assert web.label(f"r{rev[0]}", "good").json()["gallery_id"] == flipped  # a double click: still once
    assert web.label(f"r{rev[1]}", "bad").status_code == 200
    assert web.label(f"g{ids[0]}", "good").status_code == 200
    r = web.label(f"g{ids[1]}", "bad")  # a gallery image that should not be there: removed
    assert r.status_code == 200 and r.json()["removed"] is True
    assert web.label(f"g{ids[2]}", "bad").status_code == 200
    # The API shows what happened.
    assert web.http.get(f"{web.url}/api/images/g{ids[1]}", timeout=30).status_code == 404
    assert web.http.get(f"{web.url}/api/images/g{flipped}", timeout=30).json()["title"] == "rejected 0"
    review = {i["id"]: i for i in web.http.get(f"{web.url}/api/review?limit=10", timeout=30).json()["items"]}
    assert review[rev[0]]["label"] == "good" and review[rev[1]]["label"] == "bad" and review[rev[2]]["label"] is None
    # The crawler cannot bring the removed image back.
    assert c.ingest("site:1-again", {}, jpeg(96)).reason == "blocked"
    # A forged POST (no CSRF token) changes nothing.
    forged = web.http.post(f"{web.url}/api/items/g{ids[0]}/label", json={"label": "bad"}, timeout=30)
    assert forged.status_code == 403

    out = tmp_path / "labels"
    assert gb_main(["labels", "export", str(out), "--gallery", str(g.root)]) == 0
    with np.load(out / "labels.npz", allow_pickle=False) as z:
        got = dict(zip(z["keys"].tolist(), z["labels"].tolist()))
        assert z["features"].shape == (5, DIM)
    assert got == {"rev:0": 1, "rev:1": 0, "site:0": 1, "site:1": 0, "site:2": 0}
    assert len(list((out / "good").iterdir())) == 2 and len(list((out / "bad").iterdir())) == 3
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTI_SUS_")}
    run = subprocess.run([sys.executable, "-m", "anti_sus", "tune", "--models", str(onnx_models), "--good", str(out / "good"),
                          "--bad", str(out / "bad"), "--plot", str(tmp_path / "tune.png")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "good n=2, bad n=3" in run.stdout
