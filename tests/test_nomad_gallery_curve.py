"""nomad talks CURVE to gallery_bridge: --gallery-server-key / --gallery-client-key, checked at start."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
import zmq
import zmq.auth

from photocore.curve import CurveKeyError, keygen
from tests import gallery_helpers as T
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.ingest import Ingester
from gallery_bridge.server import Server, ServerConfig
from gallery_bridge.targets.folder import FolderTarget
from nomad.delivery import GalleryDeliverer, curve_keys, drain_outbox, ingest_meta
from nomad.sources.base import ImageRef
from nomad.store import Store

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def keys(tmp_path: Path) -> dict[str, Path]:
    server_pub, server_sec = keygen(tmp_path / "keys", "gallery")
    client_pub, client_sec = keygen(tmp_path / "keys", "nomad")
    return {"server": server_pub, "server_secret": server_sec, "client": client_pub, "client_secret": client_sec}


@pytest.fixture()
def curve_gallery(tmp_path: Path, keys: dict[str, Path]) -> Iterator[str]:
    """gallery_bridge's own Server with a CURVE secret (started as tests/test_gallery_ingest.py does)."""
    _pub, secret = zmq.auth.load_certificate(str(keys["server_secret"]))
    target = FolderTarget(tmp_path / "gallery")
    ingester = Ingester(Catalogue(target.catalogue_path), target)
    server = Server(ingester, ServerConfig(bind="tcp://127.0.0.1:*", curve_secret=secret))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield server.endpoint
    finally:
        server.stop()
        thread.join(10)
        ingester.close()


def one_photo_outbox(state: Path) -> Store:
    s = Store(state)
    ref = ImageRef("reddit:t3_curve:0", "https://i.redd.it/curve.jpg")
    s.add_image(ref, "t3_curve")
    sp = s.spool_path(ref.key, ".jpg")
    sp.write_bytes(T.encode(T.photo(21)))
    s.accept(ref.key, sp, ingest_meta(ref, 2000, 1500, "jpeg", {"gmm": 1.0, "watermark": None}), None, {"gmm": 1.0})
    return s


def test_delivers_over_curve(tmp_path: Path, keys: dict[str, Path], curve_gallery: str) -> None:
    curve = curve_keys(str(keys["server"]), str(keys["client_secret"]), service="gallery")
    assert curve is not None
    with one_photo_outbox(tmp_path / "state") as s:
        # Without CURVE the server never answers: the delivery waits, nothing is counted against the image.
        plain = GalleryDeliverer(curve_gallery, timeout=0.5, retries=0)
        try:
            assert drain_outbox(s, plain, sleep=lambda x: False, wait=False) == (0, 1)
        finally:
            plain.close()
        assert s.outbox()[0].attempts == 0
        d = GalleryDeliverer(curve_gallery, timeout=10, retries=0, curve=curve)
        try:
            assert drain_outbox(s, d, sleep=lambda x: False, wait=False) == (1, 0)
        finally:
            d.close()
        assert s.image_state("reddit:t3_curve:0")[0] == "delivered"


def test_bare_z85_public_key_file_and_throwaway_client_key(tmp_path: Path, keys: dict[str, Path], curve_gallery: str) -> None:
    pub, _ = zmq.auth.load_certificate(str(keys["server"]))
    raw = tmp_path / "gallery.pub"
    raw.write_bytes(pub + b"\n")
    curve = curve_keys(str(raw), None, service="gallery")  # the server allows any client: a throwaway pair
    assert curve is not None and curve[0] == pub
    with one_photo_outbox(tmp_path / "state") as s:
        d = GalleryDeliverer(curve_gallery, timeout=10, retries=0, curve=curve)
        try:
            assert drain_outbox(s, d, sleep=lambda x: False, wait=False) == (1, 0)
        finally:
            d.close()


def test_key_mistakes_are_clear(tmp_path: Path, keys: dict[str, Path]) -> None:
    with pytest.raises(CurveKeyError, match="holds a secret key"):
        curve_keys(str(keys["server_secret"]), None, service="gallery")
    renamed = tmp_path / "server.pub"  # a secret certificate under a neutral name is still caught
    renamed.write_bytes(keys["server_secret"].read_bytes())
    with pytest.raises(CurveKeyError, match="holds a secret key"):
        curve_keys(str(renamed), None, service="gallery")
    with pytest.raises(CurveKeyError, match="no secret key"):
        curve_keys(str(keys["server"]), str(keys["client"]), service="gallery")
    with pytest.raises(CurveKeyError, match="not found"):
        curve_keys(str(tmp_path / "missing.key"), None, service="gallery")
    with pytest.raises(CurveKeyError, match="needs --gallery-server-key"):
        curve_keys(None, str(keys["client_secret"]), service="gallery")


@pytest.mark.parametrize("service,which,message", [
    ("gallery", "server_secret", "--gallery-server-key"),
    ("gallery", "client", "--gallery-client-key"),
    ("anti-sus", "server_secret", "--anti-sus-server-key"),  # the same check for anti_sus's flags
    ("anti-sus", "client", "--anti-sus-client-key"),
])
def test_cli_refuses_a_wrong_key_file_with_one_line(
    tmp_path: Path, keys: dict[str, Path], service: str, which: str, message: str
) -> None:
    server = keys["server_secret"] if which == "server_secret" else keys["server"]
    client = keys["client"] if which == "client" else keys["client_secret"]
    proc = subprocess.run(
        [sys.executable, "-m", "nomad", "once", "--state-dir", str(tmp_path / "state"),
         f"--{service}-server-key", str(server), f"--{service}-client-key", str(client)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "REDDIT_CLIENT_ID": "", "REDDIT_CLIENT_SECRET": ""},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("nomad: error:")]) == 1


def test_allow_listed_client_key_gets_in_others_do_not(tmp_path: Path, keys: dict[str, Path]) -> None:
    """gallery_bridge with an allow-list (its .key_secret certificate + a directory of client .key files):
    nomad's --gallery-client-key is let in, a throwaway key pair is not."""
    allow = tmp_path / "allowed"
    allow.mkdir()
    (allow / "nomad.key").write_bytes(keys["client"].read_bytes())
    target = FolderTarget(tmp_path / "gallery")
    ingester = Ingester(Catalogue(target.catalogue_path), target)
    server = Server(ingester, ServerConfig(bind="tcp://127.0.0.1:*", curve_secret_key=keys["server_secret"], curve_allow=allow))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with one_photo_outbox(tmp_path / "state") as s:
            stranger = GalleryDeliverer(server.endpoint, timeout=0.5, retries=0,
                                        curve=curve_keys(str(keys["server"]), None, service="gallery"))
            try:
                assert drain_outbox(s, stranger, sleep=lambda x: False, wait=False) == (0, 1)
            finally:
                stranger.close()
            d = GalleryDeliverer(server.endpoint, timeout=10, retries=0,
                                 curve=curve_keys(str(keys["server"]), str(keys["client_secret"]), service="gallery"))
            try:
                assert drain_outbox(s, d, sleep=lambda x: False, wait=False) == (1, 0)
            finally:
                d.close()
    finally:
        server.stop()
        thread.join(10)
        ingester.close()
