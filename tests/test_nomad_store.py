"""State DB: outcomes survive restarts, failures retried a bounded number of times, the outbox."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from nomad.sources.base import Candidate, ImageRef, Link
from nomad.store import Store


def post(pid: str = "t3_a") -> Candidate:
    return Candidate(source="reddit", post_id=pid, title="t", links=[Link("https://i.redd.it/a.jpg", 4000, 3000)])


def ref(key: str = "reddit:t3_a:0", url: str = "https://i.redd.it/a.jpg") -> ImageRef:
    return ImageRef(key, url, 4000, 3000, meta={"title": "t"})


def test_posts_and_images_survive_restart(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.record_post(post(), "expanded")
        assert s.add_image(ref(), "t3_a")
        assert not s.add_image(ref(), "t3_a")  # same key: ignored
        s.set_image("reddit:t3_a:0", "rejected", reason="too_small")
    with Store(tmp_path) as s:
        assert s.seen_post("t3_a") and not s.seen_post("t3_b")
        assert s.image_state("reddit:t3_a:0") == ("rejected", "too_small", 0)
        assert s.work(max_retries=3) == []
    assert (tmp_path / "nomad.sqlite3").is_file()


def test_wal_mode(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        assert s._one("PRAGMA journal_mode")[0] == "wal"


def test_failed_images_retried_a_bounded_number_of_times(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.add_image(ref(), "t3_a")
        assert [r.key for r in s.work(2)] == ["reddit:t3_a:0"]
        s.set_image("reddit:t3_a:0", "failed", reason="timeout")
        assert [r.key for r in s.work(2)] == ["reddit:t3_a:0"]
        s.set_image("reddit:t3_a:0", "failed", reason="timeout")
        assert s.work(2) == []
        assert s.image_state("reddit:t3_a:0") == ("failed", "timeout", 2)
        work = s.work(5)
        assert work[0].meta == {"title": "t"} and work[0].width == 4000  # the ref round-trips


def test_failed_posts_retried_with_their_data(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.record_post(post("t3_f"), "failed", error="imgur_fetch")
        again = s.retry_posts(max_retries=2)
        assert [p.post_id for p in again] == ["t3_f"] and again[0].links[0].width == 4000
        s.record_post(post("t3_f"), "failed", error="imgur_fetch")
        assert s.retry_posts(max_retries=2) == []
        s.record_post(post("t3_f"), "expanded")
        assert s.post_state("t3_f") == ("expanded", None, 2)


def test_url_taken_by_other_key(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.add_image(ref("reddit:t3_a:0"), "t3_a")
        assert s.url_taken("https://i.redd.it/a.jpg", "reddit:t3_b:0") == "reddit:t3_a:0"
        assert s.url_taken("https://i.redd.it/a.jpg", "reddit:t3_a:0") is None


def test_outbox_keeps_bytes_until_acked_across_restart(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.add_image(ref(), "t3_a")
        spool = s.spool_path("reddit:t3_a:0", ".jpg")
        spool.write_bytes(b"\xff\xd8original")
        feats = np.arange(8, dtype=np.float32)
        s.accept("reddit:t3_a:0", spool, {"title": "t"}, feats, {"gmm": 1.0})
        assert not spool.exists()
        assert s.image_state("reddit:t3_a:0")[0] == "accepted"
    with Store(tmp_path) as s:
        (item,) = s.outbox()
        assert item.key == "reddit:t3_a:0" and item.read() == b"\xff\xd8original"
        assert item.meta == {"title": "t"}
        np.testing.assert_array_equal(item.read_features(), feats)
        s.delivery_failed(item.key, "down")
        assert s.outbox()[0].attempts == 1
        s.delivered(item.key, "added", 7)
        assert s.outbox() == [] and not item.path.exists() and not item.features.exists()
        assert s.image_state("reddit:t3_a:0")[0] == "delivered"
        st = s.stats()
        assert st["images"] == {"delivered": 1} and st["outbox"] == 0


def test_clear_spool(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.spool_path("k", ".jpg").write_bytes(b"x")
        assert s.clear_spool() == 1 and list(s.spool_dir.iterdir()) == []


def test_stats_by_reason(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.add_image(ref("k:0", "u0"), "p", state="rejected", reason="too_small")
        s.add_image(ref("k:1", "u1"), "p", state="rejected", reason="too_small")
        s.add_image(ref("k:2", "u2"), "p")
        s.set_image("k:2", "failed", reason="timeout", error="slow")
        s.record_post(post("t3_n"), "rejected", reason="nsfw")
        st = s.stats()
        assert st["images_rejected"] == {"too_small": 2}
        assert st["images_failed"] == {"timeout": 1}
        assert st["posts_rejected"] == {"nsfw": 1}
