"""anti_sus memory bounds: decoding a big 16-bit PNG, and queued work bounded by bytes (busy replies)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from PIL import Image

from anti_sus.cli import QUEUED_BYTES_CEILING, QUEUED_BYTES_FLOOR, build_parser, byte_size
from anti_sus.client import AntiSusBusy, AntiSusUnavailable, FilterClient
from anti_sus.preprocess import to_rgb, to_wire
from anti_sus.wire import Limits

from .concurrency import at_once
from .test_anti_sus_support import FakeStages, fake_server, raw_socket, recv_within, running

pytestmark = pytest.mark.timeout(180)
REPO = Path(__file__).resolve().parent.parent

PEAK_CHILD = r"""
import json, sys
import numpy as np
from PIL import Image
from anti_sus.preprocess import load_image, to_wire

def hwm_kb():
    # VmHWM starts afresh at exec (ru_maxrss would carry the parent's peak over)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

to_wire(Image.fromarray(np.zeros((64, 64), np.uint16)))  # warm up lazy imports
before = hwm_kb()
im = load_image(sys.argv[1])
wire = to_wire(im)
print(json.dumps({"pixels": im.size[0] * im.size[1], "mode": im.mode, "grown": (hwm_kb() - before) * 1024,
                  "shape": list(wire.shape), "mean": float(wire.mean())}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")
def test_16bit_png_decodes_in_a_few_bytes_per_pixel(tmp_path: Path):
    w, h = 4000, 4000
    row = np.linspace(256, 65535, w).astype(np.uint16)  # smooth: a small file, every value above 255
    png = tmp_path / "grey16.png"
    Image.fromarray(np.broadcast_to(row, (h, w)).copy()).save(png, compress_level=1)
    r = subprocess.run([sys.executable, "-c", PEAK_CHILD, str(png)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mode"] == "I;16" and out["shape"] == [512, 512, 3]
    assert 100 < out["mean"] < 160  # scaled to 8 bits (a mid-grey ramp), not clipped to white
    # The decoded 16-bit image alone is 2 bytes/pixel; a whole-image float64 copy made it about 26.
    assert out["grown"] / out["pixels"] < 8, f"{out['grown'] / out['pixels']:.1f} bytes per pixel"


def test_high_bit_depth_scaling_keeps_its_values():
    a = np.array([[0, 255, 256, 32767, 65535, 1000]], np.uint16)
    assert np.asarray(to_rgb(Image.fromarray(a)))[0, :, 0].tolist() == [0, 1, 1, 127, 255, 4]
    small = np.array([[0, 100, 255]], np.uint16)  # nothing above 255: already 8-bit values
    assert np.asarray(to_rgb(Image.fromarray(small)))[0, :, 0].tolist() == [0, 100, 255]
    i32 = Image.fromarray(np.array([[-5, 70000, 65535, 0]], np.int32), "I")
    assert np.asarray(to_rgb(i32))[0, :, 0].tolist() == [0, 255, 255, 0]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32), "F")
    assert np.asarray(to_rgb(f))[0, :, 0].tolist() == [0, 64, 128, 255]
    # big-endian 16-bit (no getextrema in Pillow) and a strip boundary inside the image
    big = Image.frombytes("I;16B", (3000, 700), np.full(3000 * 700, 65535, ">u2").tobytes())
    assert (to_wire(big) == 255).all()
    grey = np.random.default_rng(1).integers(0, 256, (300, 700), np.uint8)
    assert (to_wire(Image.fromarray(grey, "L")) == np.asarray(Image.fromarray(grey, "L").convert("RGB").resize(
        (512, 512), Image.Resampling.BICUBIC))).all()  # resizing grey first changes no pixel


# -- queued work bounded by bytes ------------------------------------------------------------

REQ = np.full((4, 128, 128, 3), 150, np.uint8)
REQ[:, 0, 0, 0] = 0  # good, not watermarked


def _header(i: int) -> bytes:
    return json.dumps({"v": 1, "op": "filter", "id": f"r{i}", "shape": list(REQ.shape), "dtype": "uint8"}).encode()


def _send_all(ctx: zmq.Context, ep: str, n: int) -> list[dict]:
    s = raw_socket(ctx, ep, zmq.DEALER)
    for i in range(n):
        s.send_multipart([b"", _header(i), REQ.tobytes()])
    replies = [json.loads(recv_within(s, 30)[1]) for _ in range(n)]
    s.close(0)
    return replies


def test_queued_bytes_bound_answers_busy_and_releases():
    ctx = zmq.Context()
    stages = FakeStages(delay=1.0)
    # room for two requests: the one being computed and one queued
    server = fake_server(stages, max_batch=4, max_queued_bytes=int(REQ.nbytes * 2.5))
    try:
        with running(server) as ep:
            replies = _send_all(ctx, ep, 6)
            codes = sorted("ok" if r["ok"] else r["error"]["code"] for r in replies)
            assert codes == ["busy"] * 4 + ["ok"] * 2, codes
            busy = next(r for r in replies if not r["ok"])
            assert "--max-queued-bytes" in busy["error"]["message"] and busy["id"].startswith("r")
            deadline = time.monotonic() + 10
            while server.held_bytes and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.held_bytes == 0  # answered work is released
            with FilterClient(ep, timeout=10) as c:
                assert c.info()["limits"]["max_queued_bytes"] == int(REQ.nbytes * 2.5)
                assert c.filter(REQ).good == [0, 1, 2, 3]  # served again once the work is done
    finally:
        ctx.destroy(0)


def test_max_queue_images_also_answers_busy():
    ctx = zmq.Context()
    server = fake_server(FakeStages(delay=1.0), max_batch=4, max_queue=4)
    try:
        with running(server) as ep:
            replies = _send_all(ctx, ep, 6)
        ok = sum(r["ok"] for r in replies)
        busy = [r for r in replies if not r["ok"]]
        assert 1 <= ok <= 2 and len(busy) == 6 - ok
        assert all(r["error"]["code"] == "busy" and "--max-queue" in r["error"]["message"] for r in busy)
    finally:
        ctx.destroy(0)


def test_one_request_bigger_than_the_bound_is_still_served():
    with running(fake_server(max_queued_bytes=10)) as ep, FilterClient(ep, timeout=10) as c:
        assert c.filter(REQ).good == [0, 1, 2, 3]


def test_client_waits_out_busy_then_gives_up_with_antisusbusy():
    ctx = zmq.Context()
    server = fake_server(FakeStages(delay=0.6), max_batch=4, max_queued_bytes=REQ.nbytes)
    try:
        with running(server) as ep:
            # three clients at once against room for one: the client retries busy until served
            def one() -> list[int]:
                with FilterClient(ep, timeout=10, busy_wait=20) as c:
                    return c.filter(REQ).good

            results, errors = at_once(one, 3, join_timeout=30)
            assert not errors and results == [[0, 1, 2, 3]] * 3
            # with no patience, a busy server is an AntiSusBusy (an AntiSusUnavailable, so callers retry later)
            hog = raw_socket(ctx, ep, zmq.DEALER)
            hog.send_multipart([b"", _header(0), REQ.tobytes()])
            time.sleep(0.2)
            with FilterClient(ep, timeout=5, busy_wait=0.3) as c, pytest.raises(AntiSusBusy) as exc:
                c.filter(REQ)
            assert isinstance(exc.value, AntiSusUnavailable) and "busy" in str(exc.value)
            recv_within(hog, 10)
            hog.close(0)
    finally:
        ctx.destroy(0)


def test_max_queued_bytes_flag_env_and_default(monkeypatch: pytest.MonkeyPatch):
    assert byte_size("512M") == 512 << 20 and byte_size("2G") == 2 << 30 and byte_size("1.5GiB") == 3 << 29
    assert byte_size("1000") == 1000
    default = build_parser().parse_args(["serve"]).max_queued_bytes
    assert QUEUED_BYTES_FLOOR <= default <= QUEUED_BYTES_CEILING
    monkeypatch.setenv("ANTI_SUS_MAX_QUEUED_BYTES", "300M")
    assert build_parser().parse_args(["serve"]).max_queued_bytes == 300 << 20
    assert build_parser().parse_args(["serve", "--max-queued-bytes", "1G"]).max_queued_bytes == 1 << 30
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-queued-bytes", "lots"])


def test_limits_default_message_size_fits_the_bound():
    # the default bound is never below one largest request, so the default server queues at least one
    assert QUEUED_BYTES_FLOOR >= Limits().max_message_bytes
