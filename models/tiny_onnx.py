"""Build a complete tiny model directory without torch (seconds, random weights): the offline demo's models.

    python -m models.tiny_onnx --out /tmp/tiny-onnx
    python -m models.manifest verify /tmp/tiny-onnx

``models.tiny`` exports small *real* architectures (an open_clip ViT, timm's
test_efficientnet) through torch; it needs the ``models`` extra (torch alone is
hundreds of MB to GB). This module writes graphs with the same contract straight
from the ``onnx`` helper API (a runtime dependency), so ``pip install .`` is
enough to run ``python -m stack.demo``:

- ``clip``: input ``image`` float32[N,3,224,224] -> ``features`` float32[N,32],
  L2-normalised inside the graph (patch Conv 32x32/32 -> Relu -> MaxPool ->
  GlobalAveragePool -> MatMul -> ReduceL2/Div), like ``clip_visual.onnx``.
- ``gmm``/``gmm_meta``: scikit-learn's GaussianMixture (``models.fit_gmm``,
  diagonal covariances) on that encoder's features of procedural images
  (``models.synth``) pushed through the preprocessing contract, as ``models.tiny`` does.
- ``watermark``: input ``image`` float32[N,3,512,512] -> ``logit`` float32[N,1]
  (patch Conv 16x16/16 -> Relu -> GlobalAveragePool -> MatMul + bias).
- ``clip_vocab``: a tiny BPE vocabulary in open_clip's file format (gzip, a
  header line, one merge per line), its merges learnt at build time from a
  few photo captions (:func:`learn_merges`), so :mod:`anti_sus.text.tokenizer`
  runs unchanged on it (``TEXT_MERGES`` merges: 512 + merges + 2 ids).
- ``clip_text``: input ``text`` int64[N,L] (L <= 77) -> ``features`` float32[N,32],
  the visual tower's dimension (token Gather + positions -> MatMul/Tanh ->
  mean over the tokens up to end-of-text -> MatMul -> ReduceL2/Div). Padding
  ids (0) are left out of the mean, so ids cut after end-of-text give the same
  features, as with the real text tower.

Weights are random (seeded): scores mean nothing, the wiring is the server's.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anti_sus.modeldir import ARTIFACTS, artifact_entry, sha256_file, write_manifest
from anti_sus.preprocess import CLIP_SPEC, WATERMARK_SPEC, stack_wire

from . import fit_gmm, synth
from ._cli import EnvParser, UserError, run_main, setup
from .manifest import verified
from .onnx_export import utc_now, versions

log = logging.getLogger(__name__)

OPSET = 17
IR_VERSION = 8  # opset 17's IR version: loadable by every onnxruntime the project accepts (>= 1.17)
EMBED_DIM = 32
CLIP_PATCH, CLIP_CHANNELS = 32, 48
WATERMARK_PATCH, WATERMARK_CHANNELS = 16, 8
TEXT_WIDTH, TEXT_CONTEXT, TEXT_MERGES = 32, 77, 160
VOCAB_HEADER = "#version: 0.2 (models.tiny_onnx: merges learnt from its built-in captions)"
CAPTIONS = (
    "a photo of a mountain lake at sunset", "a snowy mountain under a blue sky", "a forest path in autumn",
    "a sandy beach with waves and a boat", "a city street at night with lights", "a river bridge in the fog",
    "a portrait of a smiling person", "a cat sleeping on a sofa", "a dog running on the grass",
    "red flowers in a green garden", "a tall tree in a field", "clouds over the sea", "a plate of food",
    "a bird on a branch", "an old building in the town square", "a car on a country road", "a screenshot of text",
    "a meme with white letters", "a watermark in the corner", "a drawing of a house", "stars in the night sky",
)
# A negative bias keeps most random-weight logits below the default threshold, so the demo delivers photos.
WATERMARK_BIAS = -3.0
N_IMAGES = 128
N_COMPONENTS = 4
# Diagonal covariances: a full 32x32 one per component on 128 images fits the training set so tightly that
# the emulator's photos all score as outliers and the demo would deliver nothing.
COVARIANCE = "diag"
ARCH = "tiny-onnx-conv (onnx.helper, random weights)"

__all__ = ["build", "clip_graph", "learn_merges", "main", "text_graph", "watermark_graph", "write_vocab"]


def _onnx() -> Any:
    """The ``onnx`` package, or a one-line fix (it is the ``demo`` extra)."""
    try:
        import onnx
    except ImportError:
        # A dependency of the project: missing only from an install made with --no-deps.
        raise UserError("building the tiny ONNX models needs the onnx package (a dependency of this project): "
                        "pip install 'onnx>=1.15'") from None
    return onnx


def _tensor(name: str, array: np.ndarray) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def _model(graph: Any) -> Any:
    """Wrap ``graph`` into a checked model at :data:`OPSET`/:data:`IR_VERSION`."""
    onnx = _onnx()
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="models.tiny_onnx")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)  # also infers shapes: a wrong wiring fails here
    return model


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """He-normal weights: activations keep their scale through Relu, so features vary between images."""
    return rng.standard_normal(shape).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in))


def clip_graph(seed: int = 0, size: int = CLIP_SPEC.size, dim: int = EMBED_DIM) -> Any:
    """The ``clip`` contract: ``image`` float32[N,3,S,S] -> unit-norm ``features`` float32[N,dim]."""
    onnx = _onnx()
    h, T = onnx.helper, onnx.TensorProto
    if size % CLIP_PATCH:
        raise ValueError(f"clip input size {size} is not a multiple of the patch size {CLIP_PATCH}")
    rng = np.random.default_rng(seed)
    c = CLIP_CHANNELS
    inits = [
        _tensor("patch_w", _he(rng, (c, 3, CLIP_PATCH, CLIP_PATCH), 3 * CLIP_PATCH * CLIP_PATCH)),
        _tensor("patch_b", rng.standard_normal(c) * 0.1),
        _tensor("proj_w", _he(rng, (c, dim), c)),
        _tensor("proj_b", rng.standard_normal(dim) * 0.1),
        _tensor("eps", np.array([1e-12])),
    ]
    nodes = [
        h.make_node("Conv", ["image", "patch_w", "patch_b"], ["patches"], kernel_shape=[CLIP_PATCH] * 2,
                    strides=[CLIP_PATCH] * 2),
        h.make_node("Relu", ["patches"], ["act"]),
        h.make_node("MaxPool", ["act"], ["pooled"], kernel_shape=[2, 2], strides=[1, 1]),
        h.make_node("GlobalAveragePool", ["pooled"], ["gap"]),
        h.make_node("Flatten", ["gap"], ["flat"], axis=1),
        h.make_node("MatMul", ["flat", "proj_w"], ["proj"]),
        h.make_node("Add", ["proj", "proj_b"], ["raw"]),
        # L2 normalisation inside the graph, as export_clip's NormalizedVisual (clamped like torch's clamp_min).
        h.make_node("ReduceL2", ["raw"], ["norm"], axes=[1], keepdims=1),
        h.make_node("Max", ["norm", "eps"], ["safe_norm"]),
        h.make_node("Div", ["raw", "safe_norm"], ["features"]),
    ]
    graph = h.make_graph(
        nodes, "tiny_clip_visual",
        [h.make_tensor_value_info("image", T.FLOAT, ["N", 3, size, size])],
        [h.make_tensor_value_info("features", T.FLOAT, ["N", dim])],
        initializer=inits,
    )
    return _model(graph)


def watermark_graph(seed: int = 0, size: int = WATERMARK_SPEC.size) -> Any:
    """The ``watermark`` contract: ``image`` float32[N,3,S,S] -> ``logit`` float32[N,1]."""
    onnx = _onnx()
    h, T = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(seed)
    c = WATERMARK_CHANNELS
    inits = [
        _tensor("patch_w", _he(rng, (c, 3, WATERMARK_PATCH, WATERMARK_PATCH), 3 * WATERMARK_PATCH ** 2)),
        _tensor("patch_b", np.zeros(c)),
        _tensor("head_w", _he(rng, (c, 1), c) * 0.25),
        _tensor("head_b", np.array([WATERMARK_BIAS])),
    ]
    nodes = [
        h.make_node("Conv", ["image", "patch_w", "patch_b"], ["patches"], kernel_shape=[WATERMARK_PATCH] * 2,
                    strides=[WATERMARK_PATCH] * 2),
        h.make_node("Relu", ["patches"], ["act"]),
        h.make_node("GlobalAveragePool", ["act"], ["gap"]),
        h.make_node("Flatten", ["gap"], ["flat"], axis=1),
        h.make_node("MatMul", ["flat", "head_w"], ["dot"]),
        h.make_node("Add", ["dot", "head_b"], ["logit"]),
    ]
    graph = h.make_graph(
        nodes, "tiny_watermark",
        [h.make_tensor_value_info("image", T.FLOAT, ["N", 3, size, size])],
        [h.make_tensor_value_info("logit", T.FLOAT, ["N", 1])],
        initializer=inits,
    )
    return _model(graph)


def learn_merges(texts: Sequence[str] = CAPTIONS, count: int = TEXT_MERGES) -> list[tuple[str, str]]:
    """Byte-pair merges learnt from ``texts``: the most frequent adjacent pair first (ties: the smaller pair).

    Words are split and spelt as the tokenizer does (CLIP's cleaning and
    pattern, the byte symbols, ``</w>`` on the last one), so every merge can
    apply to what the tokenizer sees.
    """
    from collections import Counter

    from anti_sus.text.tokenizer import END_OF_WORD, byte_symbols, pre_tokenize

    table = byte_symbols()
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for piece in pre_tokenize(text):
            sym = [table[b] for b in piece.encode("utf-8")]
            words[tuple(sym[:-1] + [sym[-1] + END_OF_WORD])] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, n in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def write_vocab(path: Path, merges: Sequence[tuple[str, str]]) -> Path:
    """Write ``merges`` in open_clip's vocabulary format (gzip text: header line, ``a b`` per line)."""
    import gzip

    text = "\n".join([VOCAB_HEADER, *(f"{a} {b}" for a, b in merges)]) + "\n"
    # mtime 0: the same merges give the same bytes, so the manifest's sha256 is reproducible.
    path.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    return path


def text_graph(vocab_size: int, seed: int = 0, dim: int = EMBED_DIM, width: int = TEXT_WIDTH,
               context: int = TEXT_CONTEXT) -> Any:
    """The ``clip_text`` contract: ``text`` int64[N,L<=context] -> unit-norm ``features`` float32[N,dim]."""
    onnx = _onnx()
    h, T = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(seed)
    inits = [
        _tensor("tok_emb", rng.standard_normal((vocab_size, width))),
        _tensor("pos_emb", rng.standard_normal((context, width)) * 0.1),
        _tensor("mix_w", _he(rng, (width, width), width)),
        _tensor("mix_b", rng.standard_normal(width) * 0.1),
        _tensor("proj_w", _he(rng, (width, dim), width)),
        _tensor("one", np.array([1.0])),
        _tensor("eps", np.array([1e-12])),
        onnx.numpy_helper.from_array(np.array([0], dtype=np.int64), "zero_i"),
        onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "one_i"),
        onnx.numpy_helper.from_array(np.array(0, dtype=np.int64), "pad_id"),
        onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus_one"),
    ]
    nodes = [
        h.make_node("Gather", ["tok_emb", "text"], ["tokens"], axis=0),  # [N, L, W]
        # Positions 0..L-1 of the table: L comes from the input, so cut ids work.
        h.make_node("Shape", ["text"], ["shape"]),
        h.make_node("Gather", ["shape", "one_i"], ["len"], axis=0),
        h.make_node("Slice", ["pos_emb", "zero_i", "len", "zero_i"], ["pos"]),
        h.make_node("Add", ["tokens", "pos"], ["x"]),
        h.make_node("MatMul", ["x", "mix_w"], ["mixed"]),
        h.make_node("Add", ["mixed", "mix_b"], ["mixed_b"]),
        h.make_node("Tanh", ["mixed_b"], ["act"]),
        # Mean over the real tokens (SOT..EOT); padding ids are 0.
        h.make_node("Greater", ["text", "pad_id"], ["real"]),
        h.make_node("Cast", ["real"], ["mask2"], to=T.FLOAT),
        h.make_node("Unsqueeze", ["mask2", "minus_one"], ["mask"]),
        h.make_node("Mul", ["act", "mask"], ["masked"]),
        h.make_node("ReduceSum", ["masked", "one_i"], ["summed"], keepdims=0),
        h.make_node("ReduceSum", ["mask", "one_i"], ["count"], keepdims=0),
        h.make_node("Max", ["count", "one"], ["safe_count"]),
        h.make_node("Div", ["summed", "safe_count"], ["pooled"]),
        h.make_node("MatMul", ["pooled", "proj_w"], ["raw"]),
        h.make_node("ReduceL2", ["raw"], ["norm"], axes=[1], keepdims=1),
        h.make_node("Max", ["norm", "eps"], ["safe_norm"]),
        h.make_node("Div", ["raw", "safe_norm"], ["features"]),
    ]
    graph = h.make_graph(
        nodes, "tiny_clip_text",
        [h.make_tensor_value_info("text", T.INT64, ["N", "L"])],
        [h.make_tensor_value_info("features", T.FLOAT, ["N", dim])],
        initializer=inits,
    )
    return _model(graph)


def _provenance(seed: int, what: str) -> dict[str, Any]:
    return {"arch": ARCH, "pretrained": "none", "seed": seed, "trained": False, "tool": "models.tiny_onnx",
            "graph": what, "versions": versions(), "opset": OPSET, "created": utc_now()}


def build(out: Path, seed: int = 0, n_images: int = N_IMAGES, threads: int = 1) -> Path:
    """Write clip, gmm, gmm_meta, clip_text, clip_vocab, watermark plus manifest into ``out`` (no torch); returns ``out``."""
    onnx = _onnx()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    clip_file, wm_file = ARTIFACTS["clip"][0], ARTIFACTS["watermark"][0]
    onnx.save_model(clip_graph(seed), str(out / clip_file))
    # Written first: fit_gmm reads the clip entry (its file, spec and sha256) back from the manifest.
    write_manifest(out, {"clip": artifact_entry(
        out, clip_file, kind="onnx",
        input={"name": "image", "shape": ["N", 3, CLIP_SPEC.size, CLIP_SPEC.size], "dtype": "float32"},
        output={"name": "features", "dim": EMBED_DIM, "normalized": True},
        preprocess=CLIP_SPEC.to_dict(), provenance=_provenance(seed, "clip_graph"))}, merge=False)
    clip = fit_gmm.ClipModel.from_dir(out)
    # The GMM's "good images": procedural backgrounds through to_wire -> clip_input -> ONNX, as the server sees them.
    images = synth.backgrounds(n_images, seed=seed + 1, size=256)
    batches = (stack_wire(images[i:i + 32]) for i in range(0, len(images), 32))
    feats = fit_gmm.encode_wire(batches, clip, threads).astype(np.float64)
    gm, _ = fit_gmm.fit(feats, [N_COMPONENTS], COVARIANCE, seed=seed, reg_covar=1e-4)
    fit_gmm.save(out, gm, feats, clip, percentile=5.0, sweep=[], seed=seed,
                 source=f"models.tiny_onnx: {n_images} procedural images (seed {seed + 1})",
                 histogram=out / fit_gmm.HIST_FILE)
    text_file, vocab_file = ARTIFACTS["clip_text"][0], ARTIFACTS["clip_vocab"][0]
    merges = learn_merges()
    write_vocab(out / vocab_file, merges)
    vocab_size = 512 + len(merges) + 2  # bytes, bytes + </w>, merges, SOT/EOT (anti_sus.text.tokenizer)
    onnx.save_model(text_graph(vocab_size, seed + 3), str(out / text_file))
    write_manifest(out, {
        "clip_text": artifact_entry(
            out, text_file, kind="onnx",
            input={"name": "text", "shape": ["N", "L"], "dtype": "int64", "context_length": TEXT_CONTEXT},
            output={"name": "features", "dim": EMBED_DIM, "normalized": True},
            tokenizer={"vocab": "clip_vocab", "context_length": TEXT_CONTEXT, "vocab_size": vocab_size,
                       "sot": vocab_size - 2, "eot": vocab_size - 1, "pool": "mean", "cut_after_eot": True},
            provenance={**_provenance(seed + 3, "text_graph"), "visual_sha256": sha256_file(out / clip_file)}),
        "clip_vocab": artifact_entry(out, vocab_file, kind="bpe", merges=len(merges), vocab_size=vocab_size,
                                     provenance={"source": "models.tiny_onnx.learn_merges on its built-in captions",
                                                 "created": utc_now()}),
    })
    onnx.save_model(watermark_graph(seed + 2), str(out / wm_file))
    write_manifest(out, {"watermark": artifact_entry(
        out, wm_file, kind="onnx",
        input={"name": "image", "shape": ["N", 3, WATERMARK_SPEC.size, WATERMARK_SPEC.size], "dtype": "float32"},
        output={"name": "logit", "shape": ["N", 1], "activation": "sigmoid", "positive": "watermark"},
        preprocess=WATERMARK_SPEC.to_dict(), provenance=_provenance(seed + 2, "watermark_graph"))})
    return verified(out, "tiny ONNX model directory", t0)


def parser() -> EnvParser:
    p = EnvParser("tiny_onnx", description=__doc__.split("\n\n")[0])
    p.add_tiny("model directory to create (its manifest is rewritten)", N_IMAGES)
    p.add_common()
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup(args, torch_threads=False)
    t0 = time.monotonic()
    build(args.out, seed=args.seed, n_images=args.images, threads=args.threads)
    print(f"built tiny ONNX model directory {args.out} in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
