"""gallery_bridge.search: text, entry and image search over stored CLIP features, with the torch-free tiny models."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anti_sus.modeldir import artifact_entry, read_manifest, write_manifest
from anti_sus.stages.clip import ClipStage
from anti_sus.text.encoder import TextEncoder
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.ingest import Ingester
from gallery_bridge.search import BadQuery, Searcher, SearchUnavailable
from gallery_bridge.targets.folder import FolderTarget
from gallery_bridge.validate import Limits, Meta, check_image
from models import tiny_onnx
from photocore.errors import UserError
from photocore.wireimage import stack_wire
from stack.emulator.photos import encode, photo


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_onnx.build(tmp_path_factory.mktemp("models"), n_images=16)


@pytest.fixture(scope="module")
def clip(models: Path) -> ClipStage:
    entry = read_manifest(models)["artifacts"]["clip"]
    return ClipStage.from_entry(models / entry["file"], entry, threads=1, memory_budget=None)


def features_of(clip: ClipStage, data: bytes) -> np.ndarray:
    """What nomad delivers: anti_sus's CLIP features of the wire image."""
    return clip.run(clip.preprocess(stack_wire([check_image(data, Limits()).image])))[0]


class Gallery:
    def __init__(self, root: Path, clip: ClipStage) -> None:
        self.target = FolderTarget(root)
        self.catalogue = Catalogue(self.target.catalogue_path)
        self.ingester = Ingester(self.catalogue, self.target)
        self.clip = clip
        self.images: dict[int, bytes] = {}

    def add(self, seed: int, with_features: bool = True) -> int:
        data = encode(photo(seed, (320, 240)))
        feats = features_of(self.clip, data) if with_features else None
        out = self.ingester.ingest(f"test:{seed}", Meta(source="test"), check_image(data, Limits()), feats)
        assert out.status == "added", out
        known = self.catalogue.by_key(f"test:{seed}")
        assert known is not None
        self.images[known.entry_id] = data
        return known.entry_id


@pytest.fixture
def gallery(tmp_path: Path, clip: ClipStage) -> Gallery:
    g = Gallery(tmp_path / "gallery", clip)
    for seed in range(6):
        g.add(100 + seed)
    return g


def test_by_entry_finds_the_entry_itself_first(gallery: Gallery, models: Path) -> None:
    s = Searcher(gallery.target.catalogue_path, models)
    assert len(s) == 6 and s.dim == tiny_onnx.EMBED_DIM
    for entry_id in gallery.images:
        hits = s.by_entry(entry_id, 3)
        assert len(hits) == 3 and hits[0][0] == entry_id and hits[0][1] == pytest.approx(1.0, abs=1e-5)
        assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True)


def test_by_image_of_a_gallery_image_finds_it(gallery: Gallery, models: Path) -> None:
    s = Searcher(gallery.target.catalogue_path, models)
    for entry_id, data in gallery.images.items():
        best = s.by_image(data, 2)[0]
        assert best[0] == entry_id and best[1] > 0.999


def test_by_text_ranks_every_entry_by_cosine(gallery: Gallery, models: Path) -> None:
    s = Searcher(gallery.target.catalogue_path, models)
    assert s.text_available()
    hits = s.by_text("a photo of a mountain lake", 10)
    assert sorted(i for i, _ in hits) == sorted(gallery.images)
    # The same ranking as the text features against the stored ones, computed here by hand.
    q = TextEncoder.from_dir(models).encode(["a photo of a mountain lake"])[0]
    rows = gallery.catalogue.db.execute("SELECT id, features FROM entries").fetchall()
    expected = sorted(((int(r["id"]), float(np.frombuffer(r["features"], "<f4") @ q)) for r in rows),
                      key=lambda h: -h[1])
    assert [i for i, _ in hits] == [i for i, _ in expected]
    np.testing.assert_allclose([c for _, c in hits], [c for _, c in expected], atol=1e-5)
    assert len(s.by_text("a photo of a mountain lake", 2)) == 2


def test_refresh_picks_up_new_entries_and_drops_removed_ones(gallery: Gallery, models: Path) -> None:
    s = Searcher(gallery.target.catalogue_path, models)
    new = gallery.add(200)
    assert new not in [i for i, _ in s.by_entry(new, 20)] and len(s) == 6
    assert s.refresh() == 7 and s.by_entry(new, 1)[0][0] == new
    # An entry delivered without features is not searchable; one removed (labelled bad) goes away.
    gallery.add(201, with_features=False)
    gone = next(iter(gallery.images))
    gallery.catalogue.delete(gone)
    assert s.refresh() == 6
    assert gone not in [i for i, _ in s.by_text("sunset", 20)]


def test_an_entry_completed_after_a_later_one_is_not_missed(gallery: Gallery, models: Path) -> None:
    cat = gallery.catalogue
    data = encode(photo(300, (320, 240)))
    feats = features_of(gallery.clip, data)
    slow = cat.insert_pending(key="test:slow", sha256="0" * 64, phash="0" * 16, coarse=0, signature=b"x",
                              features=feats, ext="jpg", width=320, height=240, nbytes=len(data), meta={})
    s = Searcher(gallery.target.catalogue_path, models)
    fast = gallery.add(301)
    assert fast > slow and s.refresh() == 7
    cat.complete(slow, gallery_id=9999)
    assert s.refresh() == 8 and s.by_entry(slow, 1)[0][0] == slow


def test_features_of_another_dimension_are_skipped(gallery: Gallery, models: Path) -> None:
    cat = gallery.catalogue
    odd = cat.insert_pending(key="test:odd", sha256="1" * 64, phash="0" * 16, coarse=0, signature=b"x",
                             features=np.ones(16, np.float32), ext="jpg", width=1, height=1, nbytes=1, meta={})
    cat.complete(odd, gallery_id=9998)
    s = Searcher(gallery.target.catalogue_path, models)
    assert len(s) == 6 and odd not in [i for i, _ in s.by_text("x", 50)]


def test_unavailable_says_why_in_one_line(gallery: Gallery, models: Path, tmp_path: Path) -> None:
    with pytest.raises(SearchUnavailable, match="no gallery catalogue"):
        Searcher(tmp_path / "nowhere.sqlite", models)
    assert issubclass(SearchUnavailable, UserError)
    # Without a model directory: entry search works, text and image search say what is missing.
    s = Searcher(gallery.target.catalogue_path, None)
    assert not s.text_available() and s.by_entry(next(iter(gallery.images)), 1)
    for call in (lambda: s.by_text("cat", 5), lambda: s.by_image(next(iter(gallery.images.values())), 5)):
        with pytest.raises(SearchUnavailable, match="needs a model directory") as info:
            call()
        assert "\n" not in str(info.value)
    # A model directory without a text tower (built before it existed): the fix is named.
    old = tmp_path / "old-models"
    shutil.copytree(models, old)
    arts = read_manifest(old)["artifacts"]
    del arts["clip_text"], arts["clip_vocab"]
    write_manifest(old, arts, merge=False)
    s = Searcher(gallery.target.catalogue_path, old)
    assert not s.text_available()
    with pytest.raises(SearchUnavailable, match="no CLIP text tower.*models.export_clip") as info:
        s.by_text("cat", 5)
    assert "\n" not in str(info.value)
    assert s.by_image(next(iter(gallery.images.values())), 1)  # the visual tower is still there
    with pytest.raises(SearchUnavailable, match="does not exist"):
        s.by_entry(10_000, 5)


def test_a_broken_text_tower_is_one_line_not_a_traceback(gallery: Gallery, models: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(models, broken)
    (broken / "clip_text.onnx").write_bytes(b"not an onnx graph")
    arts = read_manifest(broken)["artifacts"]
    arts["clip_text"] = artifact_entry(broken, "clip_text.onnx", **{k: v for k, v in arts["clip_text"].items()
                                                                     if k not in ("file", "sha256", "bytes")})
    write_manifest(broken, arts, merge=False)  # the manifest agrees: only ONNX Runtime can tell
    s = Searcher(gallery.target.catalogue_path, broken)
    assert not s.text_available()
    with pytest.raises(SearchUnavailable, match="search is unavailable") as info:
        s.by_text("cat", 5)
    assert "\n" not in str(info.value)


def test_bad_queries_are_refused(gallery: Gallery, models: Path) -> None:
    s = Searcher(gallery.target.catalogue_path, models)
    for q in ("", "   ", "x" * 1001):
        with pytest.raises(BadQuery):
            s.by_text(q, 5)
    with pytest.raises(BadQuery, match="not a usable image"):
        s.by_image(b"<html>not an image</html>", 5)
    with pytest.raises(BadQuery, match="not a usable image"):
        s.by_image(encode(photo(1, (320, 240)))[:300], 5)  # truncated JPEG


def test_text_dimension_mismatch_is_explained(tmp_path: Path, clip: ClipStage, models: Path) -> None:
    g = Gallery(tmp_path / "g", clip)
    cat = g.catalogue
    e = cat.insert_pending(key="k", sha256="2" * 64, phash="0" * 16, coarse=0, signature=b"x",
                           features=np.ones(8, np.float32), ext="jpg", width=1, height=1, nbytes=1, meta={})
    cat.complete(e, gallery_id=1)
    s = Searcher(g.target.catalogue_path, models)
    with pytest.raises(SearchUnavailable, match="another CLIP model"):
        s.by_text("cat", 5)


def _bench_module(name: str) -> Any:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"bench_{name}_t", Path(__file__).resolve().parent.parent / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_search_benchmark_collects_its_figures() -> None:
    bench = _bench_module("search")
    figures = bench.collect(True, n=2000)
    for key in ("text_search_ms_2k", "example_search_ms_2k", "rank_ms_2k", "text_encode_ms"):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    # bench/report.py judges the full run's figures against issue 11's goal.
    report = _bench_module("report")
    assert "search" in report.BENCHMARKS
    goal = report.goal_of("search", "text_search_ms_100k", {})
    assert goal is not None and goal.met(42.0, None) and not goal.met(120.0, None)
    assert report.goal_of("search", "text_search_ms_2k", {}) is None
