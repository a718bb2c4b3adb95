"""CLIP's text tower: exported next to the visual one (torch) or built without torch (tiny_onnx), run by anti_sus.text.encoder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from anti_sus.modeldir import ModelDirError, read_manifest, verify, write_manifest
from anti_sus.text.encoder import TextEncoder
from models import tiny_onnx

PROMPTS = ["a photo of a mountain lake", "a cat", "", "Crème brûlée & 東京 🗼", "word " * 120]


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_onnx.build(tmp_path_factory.mktemp("tiny_onnx"), n_images=16)


def test_tiny_onnx_text_tower_shares_the_visual_space(onnx_dir: Path) -> None:
    arts = read_manifest(onnx_dir)["artifacts"]
    assert {"clip_text", "clip_vocab"} <= set(arts) and verify(onnx_dir) == []
    assert arts["clip_text"]["output"]["dim"] == arts["clip"]["output"]["dim"] == tiny_onnx.EMBED_DIM
    enc = TextEncoder.from_dir(onnx_dir)
    assert enc.cut and enc.tokenizer.vocab_size == arts["clip_text"]["tokenizer"]["vocab_size"]
    feats = enc.encode(PROMPTS)
    assert feats.shape == (len(PROMPTS), tiny_onnx.EMBED_DIM) and feats.dtype == np.float32
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    # Different texts, different features; the same text, the same features.
    assert not np.allclose(feats[0], feats[1]) and np.allclose(enc.encode(PROMPTS[:1])[0], feats[0], atol=1e-6)
    # The learnt merges are used: a caption word is fewer ids than bytes.
    assert len(enc.tokenizer.encode("mountain")) < len("mountain")


def test_cut_ids_give_the_full_contexts_features(onnx_dir: Path) -> None:
    enc = TextEncoder.from_dir(onnx_dir)
    assert enc.tokens(PROMPTS[:2]).shape[1] < 77
    cut = enc.encode(PROMPTS)
    enc.cut = False
    assert enc.tokens(PROMPTS[:2]).shape[1] == 77
    np.testing.assert_allclose(enc.encode(PROMPTS), cut, atol=1e-5)


def test_vocab_file_is_reproducible() -> None:
    merges = tiny_onnx.learn_merges()
    assert len(merges) == tiny_onnx.TEXT_MERGES and len(set(merges)) == len(merges)
    assert merges == tiny_onnx.learn_merges()


def test_missing_or_tampered_text_tower_names_the_fix(onnx_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(onnx_dir, d)
    (d / "bpe_simple_vocab_16e6.txt.gz").write_bytes(b"tampered")
    with pytest.raises(ModelDirError, match="clip_vocab.*does not match the manifest"):
        TextEncoder.from_dir(d)
    arts = read_manifest(d)["artifacts"]
    arts.pop("clip_text")
    write_manifest(d, arts, merge=False)
    with pytest.raises(ModelDirError, match="no CLIP text tower.*models.export_clip"):
        TextEncoder.from_dir(d)


def test_export_clip_text_tower_matches_open_clip(tmp_path: Path) -> None:
    """Our tokenizer + the exported ONNX text tower give open_clip's own tokenize + encode_text features."""
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from models.export_clip import build_text, export_clip
    from models.tiny import TINY_EMBED_DIM, TINY_TEXT_CFG, TINY_VISION_CFG

    entries = export_clip(tmp_path, arch="tiny", vision_cfg={**TINY_VISION_CFG, "layers": 1}, text_cfg=TINY_TEXT_CFG,
                          embed_dim=TINY_EMBED_DIM, seed=3)
    manifest = json.loads((tmp_path / "manifest.json").read_text())["artifacts"]
    assert {"clip", "clip_text", "clip_vocab"} <= set(manifest) and verify(tmp_path, required=()) == []
    parity = manifest["clip_text"]["provenance"]["parity"]
    assert parity["cosine"] >= 0.9999 and parity["max_abs"] <= 1e-3 and parity["cut_to"] < 77
    assert manifest["clip_text"]["provenance"]["visual_sha256"] == manifest["clip"]["sha256"]
    assert manifest["clip_vocab"]["merges"] == 48894 and entries["clip_text"]["output"]["dim"] == TINY_EMBED_DIM
    # The vocabulary is open_clip's own file, copied.
    assert (tmp_path / "bpe_simple_vocab_16e6.txt.gz").read_bytes() == Path(open_clip.tokenizer.default_bpe()).read_bytes()

    source = build_text("tiny", None, TINY_TEXT_CFG, TINY_EMBED_DIM, seed=3)  # the same seeded weights
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(source(open_clip.tokenize(PROMPTS)), dim=-1).numpy()
    got = TextEncoder.from_dir(tmp_path).encode(PROMPTS)
    cos = (ref * got).sum(axis=1)
    assert cos.min() >= 0.9999, cos


def test_export_refuses_a_non_clip_text_tower() -> None:
    pytest.importorskip("torch")
    from models._cli import UserError
    from models.export_clip import build_text, normalized_text
    from models.tiny import TINY_EMBED_DIM, TINY_TEXT_CFG

    tower = build_text("tiny", None, {**TINY_TEXT_CFG, "pool_type": "last"}, TINY_EMBED_DIM)
    with pytest.raises(UserError, match="pools 'last'"):
        normalized_text(tower)


def test_int8_text_tower_is_gated_and_preferred(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from models.export_clip import export_clip
    from models.tiny import TINY_EMBED_DIM, TINY_TEXT_CFG, TINY_VISION_CFG

    # min_speedup 0: int8 is not faster on a tower this small; the gate's cosine check still applies.
    export_clip(tmp_path, arch="tiny", vision_cfg={**TINY_VISION_CFG, "layers": 1}, text_cfg=TINY_TEXT_CFG,
                embed_dim=TINY_EMBED_DIM, seed=5, int8=True, text_int8_min_speedup=0.0)
    arts = read_manifest(tmp_path)["artifacts"]
    gate = arts["clip_text_int8"]["provenance"]["gate"]
    assert gate["passed"] and gate["cosine_min"] >= 0.99 and gate["prompts"] == 48
    assert arts["clip_text_int8"]["provenance"]["fp32_sha256"] == arts["clip_text"]["sha256"]
    auto, fp32 = TextEncoder.from_dir(tmp_path), TextEncoder.from_dir(tmp_path, variant="fp32")
    assert (auto.variant, fp32.variant) == ("clip_text_int8", "clip_text")
    cos = (auto.encode(PROMPTS) * fp32.encode(PROMPTS)).sum(axis=1)
    assert cos.min() >= 0.99
    # Re-exported without int8: the old int8 entry and file go, so nothing stale is served.
    export_clip(tmp_path, arch="tiny", vision_cfg={**TINY_VISION_CFG, "layers": 1}, text_cfg=TINY_TEXT_CFG,
                embed_dim=TINY_EMBED_DIM, seed=6, int8=False)
    assert "clip_text_int8" not in read_manifest(tmp_path)["artifacts"] and verify(tmp_path, required=()) == []
    assert TextEncoder.from_dir(tmp_path).variant == "clip_text"
    with pytest.raises(ModelDirError, match="clip_text_int8"):
        TextEncoder.from_dir(tmp_path, variant="int8")


TINY_NAMED = {"embed_dim": 32,
              "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 64, "layers": 1, "head_width": 32},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_only_text_adds_the_tower_and_keeps_clip_and_its_gmm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator's directory from before the text tower: --only-text adds it, clip (and the GMM fitted on it) stay."""
    pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from models import export_clip as E
    from models._cli import UserError

    real = open_clip.get_model_config
    monkeypatch.setattr(open_clip, "get_model_config", lambda name: TINY_NAMED if name == "tiny-named" else real(name))
    E.export_clip(tmp_path, arch="tiny-named", seed=4, text=False)
    before = read_manifest(tmp_path)["artifacts"]["clip"]
    assert "clip_text" not in read_manifest(tmp_path)["artifacts"]
    with pytest.raises(UserError, match="same model"):
        E.export_text_only(tmp_path, arch="tiny-named", seed=5)  # another random model
    with pytest.raises(UserError, match="same model"):
        E.export_text_only(tmp_path, arch="ViT-B-16", seed=4)
    assert E.main(["--out", str(tmp_path), "--arch", "tiny-named", "--seed", "4", "--only-text", "--no-int8"]) == 0
    arts = read_manifest(tmp_path)["artifacts"]
    assert arts["clip"] == before and arts["clip_text"]["provenance"]["visual_sha256"] == before["sha256"]
    assert verify(tmp_path, required=()) == [] and TextEncoder.from_dir(tmp_path).encode(["a cat"]).shape == (1, 32)
    with pytest.raises(UserError, match="no clip entry"):
        E.export_text_only(tmp_path / "empty", arch="tiny-named")


def test_ensure_models_adds_the_text_tower_to_an_old_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """`make up` on a model directory from before the text tower: it gains one; where it cannot, a warning, not a failure."""
    pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from models.export_clip import export_clip
    from models.tiny import TINY_VISION_CFG
    from stack.ensure_models import ensure_text

    real = open_clip.get_model_config
    monkeypatch.setattr(open_clip, "get_model_config", lambda name: TINY_NAMED if name == "tiny-named" else real(name))
    old = tmp_path / "old"
    export_clip(old, arch="tiny-named", seed=2, text=False)
    ensure_text(old)
    assert {"clip_text", "clip_vocab"} <= set(read_manifest(old)["artifacts"]) and verify(old, required=()) == []
    custom = tmp_path / "custom"
    export_clip(custom, arch="x", vision_cfg=TINY_VISION_CFG, embed_dim=32)
    with caplog.at_level("WARNING"):
        ensure_text(custom)
    assert "text search stays off" in caplog.text and "clip_text" not in read_manifest(custom)["artifacts"]


def test_tokenizer_encoder_and_search_run_without_torch(onnx_dir: Path, tmp_path: Path) -> None:
    """What the web app and prompt stages import: no torch anywhere (it is blocked from importing here)."""
    import subprocess
    import sys

    from tests.test_models_tiny_onnx import no_torch_env

    code = ("import sys\n"
            "from anti_sus.text.encoder import TextEncoder\n"
            "import gallery_bridge.search\n"
            "f = TextEncoder.from_dir(sys.argv[1]).encode(['a photo of a mountain lake'])\n"
            "assert f.shape == (1, 32), f.shape\n"
            "assert 'torch' not in sys.modules\n"
            "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code, str(onnx_dir)], cwd=tmp_path, env=no_torch_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
