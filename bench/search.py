"""Gallery search benchmark: text and by-example search over N stored 512-d CLIP features.

    .venv/bin/python bench/search.py [--n 100000] [--quick]

Builds a real catalogue (gallery_bridge's schema) holding N random unit
512-d features, opens it with :class:`gallery_bridge.search.Searcher` (the
load time is a figure too), then measures medians of

- ``text_search_ms_<N>``: ``refresh`` + ``by_text`` (what the web app runs per
  query) = tokenize + the text tower (ONNX Runtime, the int8 variant when it
  passes its gate, as served) + rank all N, one query at a time, 30 different queries;
- ``example_search_ms_<N>``: ``refresh`` + ``by_entry`` = read the entry's features + rank all N;
- ``text_encode_ms`` (and ``text_encode_ms_fp32``, side by side) and ``rank_ms_<N>``: the parts apart.

The text tower is CLIP ViT-B/16's architecture with random weights, exported
by ``models.export_clip`` (torch; weights do not change the cost); ``--quick``
and machines without torch use the torch-free tiny text tower
(``models.tiny_onnx``) at 512-d, so the text figure is then mostly ranking.
Goal (issue 11): < 100 ms for both at N = 100,000.
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_model  # noqa: E402
from gallery_bridge.catalogue import Catalogue  # noqa: E402
from gallery_bridge.search import Searcher  # noqa: E402

DIM = 512
QUERIES = [
    "a mountain lake at sunset", "a cat sleeping on a sofa", "city street at night", "snow on pine trees",
    "a red car", "two dogs playing on the beach", "an old stone bridge over a river", "portrait of a woman",
    "a plate of pasta", "foggy forest path", "fireworks over a harbour", "a lighthouse on a cliff",
    "children playing football", "a bowl of ramen", "desert dunes under a blue sky", "a tram in Lisbon",
    "northern lights", "a bookshelf full of books", "a horse in a field", "rain on a window",
    "an aerial view of a coastline", "cherry blossoms in Kyoto", "a vintage camera", "surfers riding a wave",
    "a cup of coffee on a wooden table", "a waterfall in the jungle", "skyscrapers in the clouds",
    "a frog on a leaf", "a crowded market", "Crème brûlée et café à Paris",
]


def median_ms(fn: Callable[[int], object], repeat: int) -> float:
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def fill_catalogue(path: Path, n: int, seed: int = 0) -> None:
    """N complete entries with random unit features, written in one transaction (what serve would have stored)."""
    Catalogue(path).close()  # the schema
    rng = np.random.default_rng(seed)
    db = sqlite3.connect(str(path))
    db.execute("PRAGMA journal_mode=WAL")
    with db:
        for start in range(0, n, 10_000):
            f = rng.standard_normal((min(10_000, n - start), DIM)).astype("<f4")
            f /= np.linalg.norm(f, axis=1, keepdims=True)
            db.executemany(
                "INSERT INTO entries (state, key, sha256, phash, coarse, signature, features, ext, width, height, "
                "bytes, added_at) VALUES ('complete', ?, ?, '0', 0, x'00', ?, 'jpg', 1, 1, 1, '2026-01-01T00:00:00Z')",
                ((f"k{start + i}", f"{start + i:064x}", row.tobytes()) for i, row in enumerate(f)))
    db.close()


def text_models(out: Path, quick: bool) -> str:
    """A model directory with a 512-d text tower; returns what it is."""
    if not quick:
        try:
            from models.export_clip import build_text, export_text, gate_text_int8
        except ImportError:
            pass
        else:
            from anti_sus.modeldir import artifact_entry, write_manifest

            fields = export_text(out, build_text("ViT-B-16", None), threads=2)
            entries = {"clip_text": artifact_entry(out, "clip_text.onnx", **fields["clip_text"]),
                       "clip_vocab": artifact_entry(out, "bpe_simple_vocab_16e6.txt.gz", **fields["clip_vocab"])}
            # The int8 variant through the exporter's own gate, as models.export_clip builds it by default.
            q = gate_text_int8(out, entries["clip_text"]["sha256"])
            if q is not None:
                entries["clip_text_int8"] = artifact_entry(out, "clip_text.int8.onnx", kind="onnx", provenance=q)
            write_manifest(out, entries)
            return f"ViT-B-16 text tower, random weights ({'int8, gated' if q else 'fp32: int8 failed its gate'})"
    from anti_sus.modeldir import artifact_entry, write_manifest
    from models import tiny_onnx

    import onnx

    merges = tiny_onnx.learn_merges()
    tiny_onnx.write_vocab(out / "bpe_simple_vocab_16e6.txt.gz", merges)
    vocab = 512 + len(merges) + 2
    onnx.save_model(tiny_onnx.text_graph(vocab, dim=DIM), str(out / "clip_text.onnx"))
    write_manifest(out, {
        "clip_text": artifact_entry(out, "clip_text.onnx", output={"dim": DIM},
                                    tokenizer={"context_length": 77, "cut_after_eot": True}),
        "clip_vocab": artifact_entry(out, "bpe_simple_vocab_16e6.txt.gz")})
    return "tiny torch-free text tower at 512-d (models.tiny_onnx)"


def collect(quick: bool, n: int | None = None) -> dict[str, float | str]:
    """Figures for bench/report.py (quick: 20k features and the tiny text tower)."""
    n = n or (20_000 if quick else 100_000)
    label = f"{n // 1000}k"
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        root = Path(tmp)
        (root / "models").mkdir()
        tower = text_models(root / "models", quick)
        cat = root / "catalogue.sqlite"
        t0 = time.perf_counter()
        fill_catalogue(cat, n)
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = Searcher(cat, root / "models", threads=1)
        load_s = time.perf_counter() - t0
        assert len(s) == n, (len(s), n)
        s.by_text("warm up", 10)
        enc = s._text_encoder()
        rng = np.random.default_rng(1)
        probes = rng.integers(1, n + 1, size=30)
        text_ms = median_ms(lambda i: (s.refresh(), s.by_text(QUERIES[i % len(QUERIES)], 50)), 30)
        example_ms = median_ms(lambda i: (s.refresh(), s.by_entry(int(probes[i]), 50)), 30)
        from anti_sus.text.encoder import TextEncoder

        fp32 = TextEncoder.from_dir(root / "models", threads=1, variant="fp32")
        fp32.encode(["warm up"])
        # Interleaved, so load from other jobs falls on both variants alike.
        enc_t, fp32_t = [], []
        for i in range(30):
            q_text = [QUERIES[(i + 7) % len(QUERIES)]]
            enc_t.append(median_ms(lambda _: enc.encode(q_text), 1))
            fp32_t.append(median_ms(lambda _: fp32.encode(q_text), 1))
        encode_ms, encode_fp32_ms = statistics.median(enc_t), statistics.median(fp32_t)
        q = s._index[0][0].copy()
        rank_ms = median_ms(lambda i: s.rank(q, 50), 30)
        refresh_ms = median_ms(lambda i: s.refresh(), 10)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        s.close()
    return {
        "cpu": cpu_model(),
        "text_tower": tower,
        f"text_search_ms_{label}": round(text_ms, 2),
        f"example_search_ms_{label}": round(example_ms, 2),
        "text_variant": enc.variant,
        "text_encode_ms": round(encode_ms, 2),
        "text_encode_ms_fp32": round(encode_fp32_ms, 2),
        f"rank_ms_{label}": round(rank_ms, 2),
        f"refresh_nothing_new_ms_{label}": round(refresh_ms, 2),
        f"index_load_s_{label}": round(load_s, 2),
        f"catalogue_fill_s_{label}": round(fill_s, 2),
        "load_average_1min": round(load, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="stored features (default 100000, 20000 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny text tower and 20k features")
    args = p.parse_args()
    for k, v in collect(args.quick, args.n).items():
        print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
