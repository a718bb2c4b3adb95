"""gallery_bridge's ``have`` op and ``IngestClient.have``: exact / near / new from hashes, bounded, strict."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zmq
from PIL import Image

from gallery_bridge.catalogue import Catalogue
from gallery_bridge.client import IngestClient, IngestError
from gallery_bridge.dedup import DedupConfig, phash64
from gallery_bridge.dedup.have import MAX_HAVE_ITEMS
from gallery_bridge.ingest import Ingester
from gallery_bridge.server import Server, ServerConfig
from gallery_bridge.targets.folder import FolderTarget
from nomad import images
from tests import gallery_helpers as T

pytestmark = pytest.mark.timeout(120)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wire_phash(data: bytes) -> str:
    """What nomad sends: the 64-bit pHash of its 512x512 wire decode."""
    return phash64(Image.fromarray(images.decode(data).wire))


def _flip(hex16: str, bits: int) -> str:
    """The hash with its lowest ``bits`` bits inverted: exactly that Hamming distance away."""
    return f"{int(hex16, 16) ^ ((1 << bits) - 1):016x}"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Ingester, str]]:
    target = FolderTarget(tmp_path / "gallery")
    ing = Ingester(Catalogue(target.catalogue_path), target)
    server = Server(ing, ServerConfig(bind="tcp://127.0.0.1:*")).start()
    try:
        yield ing, server.endpoint
    finally:
        server.close()
        ing.close()


def test_phash64_is_the_coarse_hash_every_catalogue_already_stores(served: tuple[Ingester, str]) -> None:
    ing, endpoint = served
    data = T.encode(T.photo(3, (1200, 900)))
    with IngestClient(endpoint, timeout=20, retries=0) as client:
        assert client.ingest("t:3", {}, data).status == "added"
    stored = ing.catalogue.db.execute("SELECT coarse FROM entries").fetchone()[0]
    stored_hex = f"{stored & (2**64 - 1):016x}"
    full = Image.open(io.BytesIO(data))
    assert phash64(full) == stored_hex
    # nomad hashes its wire image, not the full decode: a bit or two away at most.
    assert bin(int(_wire_phash(data), 16) ^ int(stored_hex, 16)).count("1") <= 2


def test_exact_near_and_new(served: tuple[Ingester, str]) -> None:
    _, endpoint = served
    original = T.photo(11, (1200, 900))
    data = T.encode(original, quality=92)
    resized = T.encode(original.resize((600, 450), Image.Resampling.LANCZOS), quality=70)
    recompressed = T.encode(original, quality=55)
    other = T.encode(T.photo(12, (1200, 900)))
    with IngestClient(endpoint, timeout=20, retries=0) as client:
        assert client.have([(_sha(data), _wire_phash(data))]) == ["new"]  # empty gallery
        assert client.ingest("t:11", {}, data).status == "added"
        answers = client.have([
            (_sha(data), _wire_phash(data)),
            (_sha(data).upper(), "0" * 16),  # the bytes decide, whatever the pHash; hex in either case
            (_sha(resized), _wire_phash(resized)),
            (_sha(recompressed), _wire_phash(recompressed)),
            (_sha(other), _wire_phash(other)),
            (_sha(b"x"), _wire_phash(data)),
        ])
        assert answers == ["exact", "exact", "near", "near", "new", "near"]
        assert client.have([]) == []


def test_near_is_the_have_threshold_on_the_64_bit_hash(tmp_path: Path) -> None:
    target = FolderTarget(tmp_path / "gallery")
    ing = Ingester(Catalogue(target.catalogue_path), target, DedupConfig(have_threshold=6))
    server = Server(ing, ServerConfig(bind="tcp://127.0.0.1:*")).start()
    try:
        data = T.encode(T.photo(5, (900, 700)))
        stored = phash64(Image.open(io.BytesIO(data)))
        with IngestClient(server.endpoint, timeout=20, retries=0) as client:
            client.ingest("t:5", {}, data)
            miss = _sha(b"not these bytes")
            got = client.have([(miss, _flip(stored, n)) for n in (0, 6, 7, 20)])
            assert got == ["near", "near", "new", "new"]
            assert client.info()["have"] == {"max_items": MAX_HAVE_ITEMS, "threshold": 6}
    finally:
        server.close()
        ing.close()


def _raw(endpoint: str, header: dict, *frames: bytes) -> dict:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b"", json.dumps(header).encode(), *frames])
        assert sock.poll(20_000), "no reply"
        return json.loads(sock.recv_multipart()[-1])
    finally:
        sock.close()


@pytest.mark.parametrize("items, code, words", [
    (None, "bad_header", "list of [sha256 hex"),
    ("abc", "bad_header", "list of [sha256 hex"),
    ([["a" * 64]], "bad_header", "item 0 is not"),
    ([["a" * 64, 5]], "bad_header", "item 0 is not"),
    ([["a" * 64, "0" * 16], ["g" * 64, "0" * 16]], "bad_header", "item 1: sha256"),
    ([["a" * 63, "0" * 16]], "bad_header", "item 0: sha256"),
    ([["a" * 64, "0" * 144]], "bad_header", "16 hex digits"),
    ([["a" * 64, "0x" + "0" * 14]], "bad_header", "16 hex digits"),
    ([["a" * 64, "0" * 16]] * (MAX_HAVE_ITEMS + 1), "too_large", f"limit {MAX_HAVE_ITEMS}"),
])
def test_malformed_requests_get_a_clear_error_and_the_service_goes_on(served: tuple[Ingester, str], items: object,
                                                                      code: str, words: str) -> None:
    _, endpoint = served
    header = {"v": 1, "op": "have", "id": "r1"}
    if items is not None:
        header["items"] = items
    reply = _raw(endpoint, header)
    assert reply["ok"] is False and reply["id"] == "r1"
    assert reply["error"]["code"] == code and words in reply["error"]["message"]
    ok = _raw(endpoint, {"v": 1, "op": "have", "items": [["a" * 64, "0" * 16]]})
    assert ok["ok"] is True and ok["answers"] == ["new"]


def test_binary_frames_are_refused(served: tuple[Ingester, str]) -> None:
    _, endpoint = served
    reply = _raw(endpoint, {"v": 1, "op": "have", "items": []}, b"\0" * 10)
    assert reply["error"]["code"] == "size_mismatch"


def test_client_splits_long_lists_into_bounded_requests(served: tuple[Ingester, str]) -> None:
    _, endpoint = served
    data = T.encode(T.photo(21))
    n = MAX_HAVE_ITEMS + 44
    items = [(_sha(str(i).encode()), f"{i * 0x9E3779B97F4A7C15 % 2**64:016x}") for i in range(n)]
    items[-1] = (_sha(data), "0" * 16)
    with IngestClient(endpoint, timeout=20, retries=0) as client:
        client.ingest("t:21", {}, data)
        answers = client.have(items)
    assert len(answers) == n and answers[-1] == "exact"
    assert set(answers[:-1]) <= {"new", "near"}


def test_client_refuses_a_reply_of_the_wrong_length(served: tuple[Ingester, str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, endpoint = served
    with IngestClient(endpoint, timeout=20, retries=0) as client:
        monkeypatch.setattr(client, "request", lambda header, *frames: {"ok": True, "answers": ["new"]})
        with pytest.raises(IngestError, match="expected 2 answers"):
            client.have([("a" * 64, "0" * 16)] * 2)


def test_have_threshold_flag_is_checked(tmp_path: Path) -> None:
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "gallery_bridge", "serve", "--target", f"folder:{tmp_path / 'g'}",
                          "--have-threshold", "17", "--bind", "tcp://127.0.0.1:*"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "--have-threshold must be between 0 and 16" in run.stderr
    assert "Traceback" not in run.stderr
    env_help = subprocess.run([sys.executable, "-m", "gallery_bridge", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert "GALLERY_BRIDGE_HAVE_THRESHOLD" in env_help.stdout


def test_any_within_matches_brute_force() -> None:
    from gallery_bridge.dedup import HashIndex

    rng = np.random.default_rng(4)
    stored = rng.integers(0, 2**63, size=3000, dtype=np.int64).view(np.uint64)
    ix = HashIndex(1)
    ix.add_many(np.arange(len(stored)), stored.reshape(-1, 1))
    queries = rng.integers(0, 2**63, size=40, dtype=np.int64).view(np.uint64)
    queries[::4] = stored[:10] ^ np.array([(1 << n) - 1 for n in range(10)], dtype=np.uint64)  # 0..9 bits away
    for threshold in (0, 3, 6, 12):
        brute = np.array([(np.bitwise_count(stored ^ q) <= threshold).any() for q in queries])
        assert (ix.any_within(queries.reshape(-1, 1), threshold) == brute).all()
    assert not HashIndex(1).any_within(queries.reshape(-1, 1), 64).any()  # empty index


def _wire_hashes(data: bytes) -> tuple[str, str]:
    from gallery_bridge.dedup import have_hashes

    return have_hashes(Image.fromarray(images.decode(data).wire))


def test_the_576_bit_phash_makes_near_ingests_own_rule(tmp_path: Path) -> None:
    """64 bits cannot tell a copy from another photo of the scene; with the 576-bit phash, near is what ingest would say."""
    target = FolderTarget(tmp_path / "gallery")
    ing = Ingester(Catalogue(target.catalogue_path), target, DedupConfig(have_threshold=10))  # loose on purpose
    server = Server(ing, ServerConfig(bind="tcp://127.0.0.1:*")).start()
    try:
        scene = T.scene_view(0, size=(900, 600))
        data = T.encode(scene, quality=92)
        moved = T.encode(T.scene_view(0, camera_x=0.05, size=(900, 600)))  # another photo of the place
        copy = T.encode(scene.resize((450, 300), Image.Resampling.LANCZOS), quality=60)
        with IngestClient(server.endpoint, timeout=20, retries=0) as client:
            assert client.ingest("t:scene", {}, data).status == "added"
            p64, p576 = _wire_hashes(moved)
            stored64 = phash64(Image.open(io.BytesIO(data)))
            assert bin(int(p64, 16) ^ int(stored64, 16)).count("1") <= 10  # the coarse hash alone would drop it
            assert client.have([(_sha(moved), p64)]) == ["near"]
            assert client.have([(_sha(moved), p64, p576)]) == ["new"]
            assert client.have([(_sha(copy), *_wire_hashes(copy))]) == ["near"]
            assert client.have([(_sha(data), "0" * 16, "0" * 144)]) == ["exact"]
            # and ingest agrees: the moved camera is a new photo, the copy a duplicate
            assert client.ingest("t:moved", {}, moved).status == "added"
            assert client.ingest("t:copy", {}, copy).status == "duplicate"
        reply = _raw(server.endpoint, {"v": 1, "op": "have", "items": [["a" * 64, "0" * 16, "0" * 143]]})
        assert reply["error"]["code"] == "bad_header" and "144 hex digits" in reply["error"]["message"]
    finally:
        server.close()
        ing.close()
