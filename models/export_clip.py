"""Export an open_clip CLIP's visual and text towers to ONNX, L2-normalised inside the graphs.

    python -m models.export_clip --out var/models --pretrained openai          # operator, with internet
    python -m models.export_clip --out /tmp/m --pretrained none           # random weights, offline
    python -m models.export_clip --out var/models --images ~/good-photos   # int8 gated on real images

Artifact contract: input ``image`` float32[N,3,S,S] (S from the model, 224 for
ViT-B-16), output ``features`` float32[N,D] with unit L2 norm. The parity gate
compares ONNX Runtime with torch on the same tensors; failing it exits non-zero.
By default ``clip_int8`` is built too, through the int8 gate of ``models.quantize``.

The text tower (``clip_text.onnx``, on by default, ``--no-text`` skips it):
input ``text`` int64[N,L] CLIP token ids (L <= 77, the context length), output
``features`` float32[N,D] with unit L2 norm, in the visual tower's space.
Attention is causal and the features are read at the end-of-text token, so a
batch may be cut after its longest sequence's end-of-text token (what
:mod:`anti_sus.text.encoder` does: a short query costs a few positions, not
77); the parity gate checks both the full and the cut form against open_clip's
own ``encode_text``. open_clip's BPE vocabulary (``bpe_simple_vocab_16e6.txt.gz``,
shipped inside the open_clip package) is copied next to it as ``clip_vocab``
for :mod:`anti_sus.text.tokenizer`.

With the text tower, the default prompt checks (``nsfw``, ``screenshot``,
``text-meme``, ``illustration``: :mod:`anti_sus.stages.prompts`) are encoded with
the exported ONNX tower into ``prompts.npz`` (manifest entry ``prompts``, tied to
the ``clip`` it was exported with). ``nsfw`` is on for a pretrained CLIP; with
random weights every check is written but off (its scores mean nothing).
Checks already in the directory (``anti-sus prompts add``) are kept and re-encoded.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from anti_sus.modeldir import ARTIFACTS, MANIFEST, ModelDirError, artifact_entry, read_manifest, write_manifest
from anti_sus.preprocess import CLIP_SPEC, PreprocessSpec

from ._cli import EnvParser, UserError, run_main
from .onnx_export import MAX_ABS, MIN_COSINE, OPSET, example_input, export_onnx, run_onnx, utc_now, versions

log = logging.getLogger(__name__)

DEFAULT_ARCH = "ViT-B-16"
CLIP_FILE = ARTIFACTS["clip"][0]
CLIP_INT8_FILE = ARTIFACTS["clip_int8"][0]
TEXT_FILE = ARTIFACTS["clip_text"][0]
VOCAB_FILE = ARTIFACTS["clip_vocab"][0]
TEXT_INT8_FILE = ARTIFACTS["clip_text_int8"][0]
TEXT_INT8_MIN_COSINE = 0.99
"""The int8 text tower's lowest cosine to fp32 over :func:`gate_prompts` (measured 0.9993 on random ViT-B-16)."""
TEXT_INT8_MIN_SPEEDUP = 1.0
PARITY_PROMPTS = ("a photo of a cat", "a mountain lake at sunset, seen from a boat on the water",
                  "Crème brûlée & 東京タワー 🗼", "")


def normalized_visual(visual: Any) -> Any:
    """Wrap a visual tower so its output is L2-normalised (the server compares unit vectors)."""
    import torch

    class NormalizedVisual(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            f = self.inner(image)
            return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    return NormalizedVisual(visual).eval()


def load_pretrained(arch: str, pretrained: str) -> Any:
    """open_clip's whole ``arch`` model with ``pretrained`` weights (downloads; a one-line error otherwise)."""
    import open_clip

    try:
        return open_clip.create_model(arch, pretrained=pretrained, require_pretrained=True).eval()
    except Exception as exc:  # download/tag errors come in many types; all are the user's to fix
        raise UserError(f"could not load open_clip {arch} weights {pretrained!r}: {exc}") from None


def build_visual(arch: str = DEFAULT_ARCH, pretrained: str | None = None, vision_cfg: dict[str, Any] | None = None,
                 embed_dim: int | None = None, seed: int = 0, model: Any = None) -> tuple[Any, PreprocessSpec]:
    """The visual tower of ``arch`` and its preprocessing spec.

    ``pretrained`` None builds random weights (seeded) without touching the
    network; ``vision_cfg``/``embed_dim`` override the architecture (``models.tiny``).
    ``model``: an already loaded pretrained model (one download for both towers).
    """
    import open_clip
    import torch

    torch.manual_seed(seed)
    if pretrained:
        visual = (model if model is not None else load_pretrained(arch, pretrained)).visual
        cfg = getattr(visual, "preprocess_cfg", None) or {}
    else:
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        base = open_clip.get_model_config(arch)
        if base is None and vision_cfg is None:
            raise UserError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
        vcfg = dict(base["vision_cfg"] if base else {}) if vision_cfg is None else dict(vision_cfg)
        dim = embed_dim or (base or {}).get("embed_dim", 512)
        # Only the visual tower: building the text tower of a random model is wasted time.
        visual = _build_vision_tower(dim, CLIPVisionCfg(**vcfg), quick_gelu=bool((base or {}).get("quick_gelu", False)))
        cfg = {}
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(float(v) for v in cfg.get("mean", CLIP_SPEC.mean))
    std = tuple(float(v) for v in cfg.get("std", CLIP_SPEC.std))
    spec = PreprocessSpec("clip", size, mean, std)  # type: ignore[arg-type]
    return visual.eval(), spec


def build_text(arch: str = DEFAULT_ARCH, pretrained: str | None = None, text_cfg: dict[str, Any] | None = None,
               embed_dim: int | None = None, seed: int = 0, model: Any = None) -> Any:
    """The text side of ``arch``: a whole pretrained CLIP (``model`` or loaded) or a seeded random text tower.

    Either has ``token_embedding``, ``positional_embedding``, ``transformer``,
    ``ln_final``, ``text_projection`` and ``attn_mask`` (open_clip's CLIP keeps
    them on the model, its TextTransformer on itself); :func:`normalized_text` wraps both.
    """
    import open_clip
    import torch

    if pretrained:
        return model if model is not None else load_pretrained(arch, pretrained)
    from open_clip.model import CLIPTextCfg, _build_text_tower

    torch.manual_seed(seed + 1)  # not the visual tower's seed: the two towers must not share weights by accident
    base = open_clip.get_model_config(arch)
    if base is None and text_cfg is None:
        raise UserError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    tcfg = dict(base["text_cfg"] if base else {}) if text_cfg is None else dict(text_cfg)
    dim = embed_dim or (base or {}).get("embed_dim", 512)
    if tcfg.get("hf_model_name"):
        raise UserError(f"{arch}: its text tower is a Hugging Face model; only CLIP's own text transformer is exported")
    return _build_text_tower(dim, CLIPTextCfg(**tcfg), quick_gelu=bool((base or {}).get("quick_gelu", False))).eval()


def normalized_text(source: Any) -> Any:
    """``source``'s text tower as a module: int64 ids [N, L<=context] -> unit-norm features [N, D].

    Positions and the causal mask are cut to L, so ids cut after the last
    end-of-text token give the features of the full 77 (attention never looks ahead).
    """
    import torch

    pool = getattr(source, "text_pool_type", getattr(source, "pool_type", None))
    if pool != "argmax" or getattr(source, "cls_emb", None) is not None or getattr(source, "attn_mask", None) is None:
        raise UserError(f"only CLIP-style text towers (causal, pooled at the end-of-text token) are exported; "
                        f"this one pools {pool!r}")
    for blk in source.transformer.resblocks:
        attn = getattr(blk, "attn", None)
        if hasattr(blk, "ln_1_kv") or not all(hasattr(blk, a) for a in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")) \
                or getattr(attn, "in_proj_weight", None) is None or not getattr(attn, "_qkv_same_embed_dim", False):
            raise UserError(f"text tower block {type(blk).__name__} is not open_clip's ResidualAttentionBlock; "
                            "only CLIP's own text transformer is exported")

    class NormalizedText(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.token_embedding, self.transformer, self.ln_final = m.token_embedding, m.transformer, m.ln_final
            self.positional_embedding, self.text_projection = m.positional_embedding, m.text_projection
            self.register_buffer("attn_mask", m.attn_mask.clone(), persistent=False)

        def block(self, blk: Any, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            """open_clip's ResidualAttentionBlock with the attention written out: nn.MultiheadAttention's
            traced graph bakes the sequence length into its reshapes, which would pin L to the traced one."""
            attn = blk.attn
            heads = attn.num_heads
            q, k, v = torch.nn.functional.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # [N, H, L, head_dim]
            a = torch.softmax(q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5) + mask, dim=-1) @ v
            x = x + blk.ls_1(attn.out_proj(a.transpose(1, 2).flatten(2)))
            return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

        def forward(self, text: torch.Tensor) -> torch.Tensor:
            n = text.shape[1]
            x = self.token_embedding(text) + self.positional_embedding[:n]
            mask = self.attn_mask[:n, :n]
            for blk in self.transformer.resblocks:
                x = self.block(blk, x, mask)
            x = self.ln_final(x)
            # The end-of-text token has the highest id, so argmax finds it (as open_clip's 'argmax' pooling).
            x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
            if isinstance(self.text_projection, torch.nn.Linear):
                x = self.text_projection(x)
            elif self.text_projection is not None:
                x = x @ self.text_projection
            return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    return NormalizedText(source).eval()


def open_clip_text_features(source: Any, ids: Any) -> Any:
    """open_clip's own text features for ``ids`` (the parity reference), L2-normalised."""
    import torch

    with torch.inference_mode():
        f = source.encode_text(ids) if hasattr(source, "encode_text") else source(ids)
        return torch.nn.functional.normalize(f.float(), dim=-1).numpy()


def copy_vocab(out: Path) -> Path:
    """open_clip's BPE vocabulary file copied into ``out`` (it ships inside the open_clip package)."""
    from open_clip.tokenizer import default_bpe

    src = Path(default_bpe())
    if not src.is_file():
        raise UserError(f"open_clip's BPE vocabulary {src} is missing; reinstall open_clip_torch")
    tmp = out / (VOCAB_FILE + ".tmp")
    shutil.copyfile(src, tmp)
    tmp.chmod(0o644)
    tmp.replace(out / VOCAB_FILE)
    return out / VOCAB_FILE


def export_text(out: Path, source: Any, *, opset: int = OPSET, min_cosine: float = MIN_COSINE,
                max_abs: float = MAX_ABS, threads: int = 1) -> dict[str, dict[str, Any]]:
    """Export ``source``'s text tower and copy the vocabulary; gate on parity; returns their manifest fields.

    The gate tokenizes :data:`PARITY_PROMPTS` with :mod:`anti_sus.text.tokenizer`
    (so the vocabulary and the embedding table must agree) and compares ONNX
    Runtime, on full and on cut ids, with open_clip's ``encode_text``.
    """
    import warnings

    import onnx
    import torch

    from anti_sus.text.tokenizer import Tokenizer

    from .onnx_export import Parity, ParityError, compare

    module = normalized_text(source)
    context = int(module.positional_embedding.shape[0])
    vocab_rows = int(module.token_embedding.weight.shape[0])
    tok = Tokenizer(copy_vocab(out), context_length=context)
    if tok.vocab_size != vocab_rows:
        raise UserError(f"the text tower has {vocab_rows} token embeddings but the BPE vocabulary {tok.vocab_size} ids")
    ids = tok(PARITY_PROMPTS)
    cut = int((ids == tok.eot_id).argmax(axis=1).max()) + 1
    tmp = out / (TEXT_FILE + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter notices; the parity gate decides
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA op has no ONNX translation
        try:
            with torch.no_grad():
                # Traced at a length below the context so the cut to L stays a graph operation, not a constant.
                torch.onnx.export(module, (torch.from_numpy(ids[:2, :max(cut, 4)]),), str(tmp),
                                  input_names=["text"], output_names=["features"],
                                  dynamic_axes={"text": {0: "N", 1: "L"}, "features": {0: "N"}},
                                  opset_version=opset, do_constant_folding=True, dynamo=False)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    onnx.checker.check_model(str(tmp))
    ref = open_clip_text_features(source, torch.from_numpy(ids))
    full = run_onnx(tmp, ids, threads)
    short = run_onnx(tmp, np.ascontiguousarray(ids[:, :cut]), threads)
    (c1, m1), (c2, m2) = compare(ref, full), compare(ref, short)
    parity = Parity(min(c1, c2), max(m1, m2), len(ids))
    if not parity.ok(min_cosine, max_abs):
        tmp.unlink(missing_ok=True)
        raise ParityError(f"parity gate failed for {TEXT_FILE}: cosine {parity.cosine:.6f} (need >= {min_cosine}), "
                          f"max-abs {parity.max_abs:.3g} (need <= {max_abs}) on {len(ids)} prompts, full and cut to {cut}",
                          parity)
    tmp.replace(out / TEXT_FILE)
    log.info("exported %s: cosine %.6f, max-abs %.3g", out / TEXT_FILE, parity.cosine, parity.max_abs)
    text = {
        "kind": "onnx",
        "input": {"name": "text", "shape": ["N", "L"], "dtype": "int64", "context_length": context},
        "output": {"name": "features", "dim": int(full.shape[1]), "normalized": True},
        "tokenizer": {"vocab": "clip_vocab", "context_length": context, "vocab_size": tok.vocab_size,
                      "sot": tok.sot_id, "eot": tok.eot_id, "pool": "argmax", "cut_after_eot": True},
        "parity": {**parity.to_dict(), "cut_to": cut, "reference": "open_clip encode_text"},
    }
    vocab = {"kind": "bpe", "merges": len(tok.ranks), "vocab_size": tok.vocab_size,
             "provenance": {"source": "open_clip package (bpe_simple_vocab_16e6.txt.gz)", "versions": versions()}}
    return {"clip_text": text, "clip_vocab": vocab}


def gate_prompts() -> list[str]:
    """48 varied prompts (subjects x templates, of several lengths) that judge the int8 text tower."""
    subjects = ["a cat", "a mountain lake at sunset", "two children playing football in the rain", "a bowl of ramen",
                "an old stone bridge", "a city street at night", "a screenshot of a chat", "a meme with text",
                "a watermark in the corner", "a portrait", "snow on pine trees", "Crème brûlée à Paris"]
    templates = ["{}", "a photo of {}.", "a blurry picture of {}, taken with an old phone",
                 "a professional high resolution photograph of {} in beautiful natural light"]
    return [t.format(x) for x in subjects for t in templates]


def gate_text_int8(out: Path, fp32_sha256: str, *, threads: int = 1, min_cosine: float = TEXT_INT8_MIN_COSINE,
                   min_speedup: float = TEXT_INT8_MIN_SPEEDUP) -> dict[str, Any] | None:
    """Dynamic int8 (MatMul/Gemm weights) of ``clip_text.onnx``, kept when it passes its gate; the manifest fields.

    The gate: over :func:`gate_prompts`, the lowest cosine to fp32's features
    >= ``min_cosine``, and one short query (cut ids, batch 1, what search runs)
    at least ``min_speedup`` times as fast as fp32 (median of 15). The text
    tower's cost is reading its weights for a few positions, so int8 weights
    pay off where they would not for a batch of images. Returns None (and logs
    why) when it fails; the file is then not written.
    """
    import statistics
    import time

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from anti_sus.text.tokenizer import Tokenizer

    from .onnx_export import compare, ort_session

    tmp = out / (TEXT_INT8_FILE + ".tmp")
    quantize_dynamic(str(out / TEXT_FILE), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    tok = Tokenizer(out / VOCAB_FILE)
    ids = tok(gate_prompts())
    ids = np.ascontiguousarray(ids[:, : int((ids == tok.eot_id).argmax(axis=1).max()) + 1])
    s32, s8 = ort_session(out / TEXT_FILE, threads), ort_session(tmp, threads)
    a, b = s32.run(None, {"text": ids})[0], s8.run(None, {"text": ids})[0]
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    one = np.ascontiguousarray(tok(["a mountain lake at sunset"])[:, :7])

    def median_s(sess: Any) -> float:
        sess.run(None, {"text": one})
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            sess.run(None, {"text": one})
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    # Interleaved rounds: load from other jobs falls on both alike.
    t32, t8 = zip(*((median_s(s32), median_s(s8)) for _ in range(3)))
    speedup = statistics.median(t32) / max(statistics.median(t8), 1e-9)
    _, max_abs = compare(a, b)
    gate = {"method": "dynamic", "weights": "int8 (MatMul, Gemm)", "prompts": len(ids),
            "cosine_min": round(float(cos.min()), 6), "cosine_median": round(float(np.median(cos)), 6),
            "max_abs": float(f"{max_abs:.3g}"), "speedup": round(speedup, 3), "min_cosine": min_cosine,
            "min_speedup": min_speedup}
    gate["passed"] = bool(cos.min() >= min_cosine and speedup >= min_speedup)
    if not gate["passed"]:
        tmp.unlink(missing_ok=True)
        log.warning("clip_text_int8 not kept: cosine min %.5f (need >= %s), %.2fx fp32 (need >= %s)",
                    cos.min(), min_cosine, speedup, min_speedup)
        return None
    tmp.replace(out / TEXT_INT8_FILE)
    log.info("clip_text_int8: cosine min %.5f, %.2fx fp32", cos.min(), speedup)
    return {"gate": gate, "fp32_sha256": fp32_sha256}


def gate_int8(out: Path, spec: PreprocessSpec, images: Path | None = None, threads: int = 1,
              write: bool = True) -> tuple[Any, dict[str, Any] | None]:
    """Run the int8 gate (``models.quantize``) on the fresh ``clip``; returns (report, entry or None).

    With ``images`` (real photos, e.g. the taste images) they calibrate and judge
    the variants; without, procedural images do and the report says so. The GMM
    decision is checked only when a GMM fitted on this very clip is in ``out``
    (at first export there is none: ``stack.ensure_models`` and
    ``python -m models.quantize`` rerun the gate after the fit, see docs/models.md).
    """
    from . import quantize, synth
    from anti_sus.preprocess import model_input, stack_wire

    decisions = [d for d in [quantize.gmm_decision(out)] if d is not None]
    if images is not None:
        from .fit_gmm import find_images

        calib, held = quantize.split(find_images(images))
        cx, hx = quantize.load_inputs(calib, spec), quantize.load_inputs(held, spec)
        what = f"{len(hx)} held out / {len(cx)} calibration of the images under {images}"
    else:
        x = model_input(stack_wire(synth.backgrounds(48, seed=7, size=256)), spec)
        ci, hi = quantize.split(list(range(len(x))))
        cx, hx = x[ci], x[hi]
        what = f"{len(hx)} held out / {len(cx)} calibration procedural images (models.synth; no real images given)"
    return quantize.build_int8(out, "clip", cx, hx, decisions, images=what, threads=threads, write=write)


def text_tower_entries(out: Path, *, arch: str, pretrained: str | None, model: Any, text_cfg: dict[str, Any] | None,
                       embed_dim: int | None, seed: int, provenance: dict[str, Any], visual_sha256: str | None,
                       visual_dim: int, int8: bool, opset: int = OPSET, min_cosine: float = MIN_COSINE,
                       max_abs: float = MAX_ABS, threads: int = 1,
                       text_int8_min_speedup: float = TEXT_INT8_MIN_SPEEDUP) -> dict[str, dict[str, Any]]:
    """Export the text tower (and its gated int8 variant), copy the vocabulary; their manifest entries."""
    source = build_text(arch, pretrained, text_cfg, embed_dim, seed, model=model)
    fields = export_text(out, source, opset=opset, min_cosine=min_cosine, max_abs=max_abs, threads=threads)
    prov_t = {**provenance, "parity": fields["clip_text"].pop("parity"), "seed": None if pretrained else seed + 1,
              "arch": arch if text_cfg is None else f"{arch} (custom text: {text_cfg}, embed_dim {embed_dim})",
              "visual_sha256": visual_sha256}  # the visual tower whose space it shares
    if fields["clip_text"]["output"]["dim"] != visual_dim:
        raise UserError(f"text features have {fields['clip_text']['output']['dim']} dimensions, visual {visual_dim}")
    entries = {"clip_text": artifact_entry(out, TEXT_FILE, **fields["clip_text"], provenance=prov_t),
               "clip_vocab": artifact_entry(out, VOCAB_FILE, **fields["clip_vocab"])}
    (out / TEXT_INT8_FILE).unlink(missing_ok=True)  # one quantized from an older text tower must not survive
    if int8:
        q = gate_text_int8(out, entries["clip_text"]["sha256"], threads=threads, min_speedup=text_int8_min_speedup)
        if q is not None:
            entries["clip_text_int8"] = artifact_entry(
                out, TEXT_INT8_FILE, **{k: v for k, v in fields["clip_text"].items() if k != "kind"}, kind="onnx",
                provenance={**prov_t, **q, "tool": "models.export_clip (onnxruntime quantize_dynamic)"})
    return entries


def _write_entries(out: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Merge ``entries`` into the manifest; a text export without int8 drops the old ``clip_text_int8`` entry."""
    if "clip_text" in entries and "clip_text_int8" not in entries and (out / MANIFEST).is_file():
        # An int8 text entry from an earlier export would name a file that is gone (or another tower's).
        kept = {k: v for k, v in read_manifest(out)["artifacts"].items() if k != "clip_text_int8"}
        write_manifest(out, {**kept, **entries}, merge=False)
    else:
        write_manifest(out, entries)


def export_text_only(out: Path, *, arch: str = DEFAULT_ARCH, pretrained: str | None = None, int8: bool = True,
                     opset: int = OPSET, min_cosine: float = MIN_COSINE, max_abs: float = MAX_ABS, threads: int = 1,
                     seed: int = 0) -> dict[str, dict[str, Any]]:
    """Add the text tower to a model directory whose ``clip`` is already there (and stays, with its GMM).

    The text tower must come from the model the visual tower came from: the
    manifest's ``clip`` provenance (arch, pretrained tag, seed) must match, else one line says so.
    """
    try:
        clip = read_manifest(out)["artifacts"]["clip"]
    except (ModelDirError, KeyError):
        raise UserError(f"{out} has no clip entry to pair a text tower with; export both: "
                        f"python -m models.export_clip --out {out} --pretrained {pretrained or 'none'}") from None
    prov = clip.get("provenance") or {}
    want = {"arch": arch, "pretrained": pretrained or "none"}
    have = {"arch": prov.get("arch"), "pretrained": prov.get("pretrained")}
    if have != want or (not pretrained and prov.get("seed") != seed):
        raise UserError(f"the clip in {out} was exported from {have['arch']} / {have['pretrained']} (seed "
                        f"{prov.get('seed')}); its text tower must come from the same model: pass those flags")
    model = load_pretrained(arch, pretrained) if pretrained else None
    provenance = {"arch": arch, "pretrained": pretrained or "none", "tool": "models.export_clip --only-text",
                  "versions": versions(), "opset": opset, "created": utc_now()}
    entries = text_tower_entries(out, arch=arch, pretrained=pretrained, model=model, text_cfg=None, embed_dim=None,
                                 seed=seed, provenance=provenance, visual_sha256=clip.get("sha256"),
                                 visual_dim=int((clip.get("output") or {}).get("dim", 0)), int8=int8, opset=opset,
                                 min_cosine=min_cosine, max_abs=max_abs, threads=threads)
    _write_entries(out, entries)
    entries["prompts"] = export_prompts(out, pretrained=pretrained, model=model)
    return entries


def export_prompts(out: Path, *, pretrained: str | None, model: Any) -> dict[str, Any]:
    """Encode the default prompt checks (and those already in ``out``) with the fresh text tower; their entry."""
    from anti_sus.stages.prompts import DEFAULT_LOGIT_SCALE, write_defaults

    scale = DEFAULT_LOGIT_SCALE
    if model is not None and getattr(model, "logit_scale", None) is not None:
        scale = float(model.logit_scale.detach().exp().reshape(-1)[0])  # the model's own zero-shot temperature
    return write_defaults(out, enable=bool(pretrained), logit_scale=scale, tool="models.export_clip")


def export_clip(out: Path, *, arch: str = DEFAULT_ARCH, pretrained: str | None = None, int8: bool = False,
                images: Path | None = None,
                opset: int = OPSET, min_cosine: float = MIN_COSINE, max_abs: float = MAX_ABS, threads: int = 1,
                vision_cfg: dict[str, Any] | None = None, embed_dim: int | None = None, seed: int = 0,
                write: bool = True, text: bool = True, text_cfg: dict[str, Any] | None = None,
                text_int8_min_speedup: float = TEXT_INT8_MIN_SPEEDUP) -> dict[str, dict[str, Any]]:
    """Build, export, gate and (with ``write``) add ``clip`` (``clip_int8``, ``clip_text``, ``clip_vocab``) to ``out``'s manifest.

    Returns the manifest entries. Raises :class:`ParityError` when a gate fails.
    """
    out.mkdir(parents=True, exist_ok=True)
    model = load_pretrained(arch, pretrained) if pretrained else None
    visual, spec = build_visual(arch, pretrained, vision_cfg, embed_dim, seed, model=model)
    module = normalized_visual(visual)
    parity = export_onnx(module, out / CLIP_FILE, size=spec.size, output_name="features", opset=opset,
                         min_cosine=min_cosine, max_abs=max_abs, threads=threads)
    dim = int(run_onnx(out / CLIP_FILE, example_input(1, spec.size)).shape[1])
    io = {
        "input": {"name": "image", "shape": ["N", 3, spec.size, spec.size], "dtype": "float32"},
        "output": {"name": "features", "dim": dim, "normalized": True},
        "preprocess": spec.to_dict(),
    }
    provenance = {
        "arch": arch if vision_cfg is None else f"{arch} (custom: {vision_cfg}, embed_dim {embed_dim})",
        "pretrained": pretrained or "none",
        "seed": None if pretrained else seed,
        "tool": "models.export_clip",
        "versions": versions(),
        "opset": opset,
        "parity": parity.to_dict(),
        "created": utc_now(),
    }
    entries = {"clip": artifact_entry(out, CLIP_FILE, kind="onnx", **io, provenance=provenance)}
    if text and vision_cfg is not None and text_cfg is None and not pretrained:
        # A custom visual architecture says nothing about its text tower: export one only when told its shape.
        log.info("custom vision_cfg without text_cfg: no text tower exported")
    elif text:
        entries.update(text_tower_entries(
            out, arch=arch, pretrained=pretrained, model=model, text_cfg=text_cfg, embed_dim=embed_dim, seed=seed,
            provenance=provenance, visual_sha256=entries["clip"]["sha256"], visual_dim=dim, int8=int8, opset=opset,
            min_cosine=min_cosine, max_abs=max_abs, threads=threads, text_int8_min_speedup=text_int8_min_speedup))
    if write:
        _write_entries(out, entries)
        if "clip_text" in entries:
            entries["prompts"] = export_prompts(out, pretrained=pretrained, model=model)
    if int8:
        # The gate reads the manifest's clip entry, so it runs after the fp32 entry is written.
        report, entry = gate_int8(out, spec, images, threads, write)
        print(report.summary())
        if entry is not None:
            entries["clip_int8"] = entry
    return entries


def parser() -> EnvParser:
    p = EnvParser("export_clip", description=__doc__.split("\n\n")[0])
    p.add_env("--arch", default=DEFAULT_ARCH, help="open_clip architecture name")
    p.add_env("--pretrained", default="none",
              help="open_clip pretrained tag (e.g. openai, laion2b_s34b_b88k; downloads) or 'none' for random weights")
    p.add_env("--seed", type=int, default=0, help="seed for random weights (--pretrained none)")
    p.add_env("--int8", action="store_true", default=True,
              help="also build clip_int8 through the int8 gate (models.quantize: dynamic and static QDQ, the fastest "
                   "variant with parity on held-out images is kept) and clip_text_int8 through its own gate (cosine "
                   "to fp32 on 48 prompts, faster than fp32); --no-int8 skips both")
    p.add_env("--text", action="store_true", default=True,
              help="also export the text tower (clip_text.onnx) and copy open_clip's BPE vocabulary next to it "
                   "(text search, prompt stages); --no-text skips both")
    p.add_env("--only-text", action="store_true", default=False,
              help="add only the text tower (and vocabulary) to a directory whose clip came from the same "
                   "--arch/--pretrained/--seed: clip and the GMM fitted on it stay as they are")
    p.add_env("--images", type=Path, default=None,
              help="real images (e.g. the taste images) that calibrate and judge the int8 variants (default: procedural images)")
    p.add_export()
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_export(argv)
    pretrained = None if args.pretrained.lower() in ("", "none", "random") else args.pretrained
    if args.only_text:
        entries = export_text_only(args.out, arch=args.arch, pretrained=pretrained, int8=args.int8, opset=args.opset,
                                   min_cosine=args.min_cosine, max_abs=args.max_abs, threads=args.threads, seed=args.seed)
        t = entries["clip_text"]["provenance"]["parity"]
        print(f"wrote {args.out / TEXT_FILE} and {args.out / VOCAB_FILE}: parity cosine {t['cosine']}, max-abs {t['max_abs']}"
              f"{'; int8 variant kept' if 'clip_text_int8' in entries else ''}")
        return 0
    entries = export_clip(args.out, arch=args.arch, pretrained=pretrained, int8=args.int8, images=args.images, opset=args.opset,
                          min_cosine=args.min_cosine, max_abs=args.max_abs, threads=args.threads, seed=args.seed,
                          text=args.text)
    p = entries["clip"]["provenance"]["parity"]
    print(f"wrote {args.out / CLIP_FILE}: dim {entries['clip']['output']['dim']}, parity cosine {p['cosine']}, max-abs {p['max_abs']}")
    if "clip_text" in entries:
        t = entries["clip_text"]["provenance"]["parity"]
        print(f"wrote {args.out / TEXT_FILE} and {args.out / VOCAB_FILE}: parity cosine {t['cosine']}, max-abs {t['max_abs']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
