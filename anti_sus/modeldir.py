"""The model directory and its ``manifest.json`` (docs/design.md §4).

A model directory holds the artifacts anti_sus loads and a manifest describing
each one. This module reads, writes and verifies manifests; it needs only the
standard library so the server can check its models before importing anything
heavy. ``models.manifest`` is the command-line face of it.

Manifest layout::

    {
      "format": 1,
      "artifacts": {
        "<name>": {
          "file": "clip_visual.onnx",          # relative to the directory, no '..'
          "sha256": "…",
          "bytes": 12345,
          "kind": "onnx" | "gmm" | "json" | …,
          "input": {…},                        # e.g. {"name": "image", "shape": ["N",3,224,224], "dtype": "float32"}
          "output": {…},                       # e.g. {"name": "features", "dim": 512}
          "preprocess": {…},                   # PreprocessSpec.to_dict(), for models fed with pixels
          "provenance": {…}                    # arch, pretrained tag, tool, versions, parity figures, created
        }, …
      }
    }

Artifact names the server knows (``ARTIFACTS``): ``clip``, ``clip_int8``,
``gmm``, ``gmm_meta``, ``watermark``, ``watermark_int8``, ``probe`` (``anti-sus learn``;
:mod:`anti_sus.stages.probe`), ``clip_text``, ``clip_text_int8`` and ``clip_vocab`` (CLIP's text tower,
its int8 variant and the tokenizer vocabulary, :mod:`anti_sus.text`). ``clip``, ``gmm`` and
``gmm_meta`` are required; the rest are optional. An optional ``"pipeline"`` list names the
stages in the order they judge (:data:`STAGES`, :func:`pipeline_of`): with it only ``clip`` and the
listed stages' artifacts are required and only those stages run. An int8 entry carries the
report of the int8 gate (``provenance.gate``, written by ``models.quantize``);
:func:`int8_unusable` says whether it may be served by default.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from photocore.atomic import atomic_write

MANIFEST = "manifest.json"
FORMAT = 1

# name -> (default file name, command that builds it)
ARTIFACTS: dict[str, tuple[str, str]] = {
    "clip": ("clip_visual.onnx", "python -m models.export_clip --out DIR --pretrained openai"),
    "clip_int8": ("clip_visual.int8.onnx", "python -m models.quantize --models DIR --images GOOD_IMAGES"),
    "gmm": ("gmm.npz", "python -m models.fit_gmm --models DIR --images GOOD_IMAGES"),
    "gmm_meta": ("gmm.json", "python -m models.fit_gmm --models DIR --images GOOD_IMAGES"),
    "watermark": ("watermark.onnx", "python -m models.export_watermark --weights WEIGHTS --out DIR"),
    "watermark_int8": ("watermark.int8.onnx", "python -m models.quantize --models DIR --images IMAGES --target watermark"),
    "probe": ("probe.npz", "anti-sus learn --labels LABELS --models DIR"),
    # Zero-shot prompt checks encoded with the text tower (anti_sus.stages.prompts); export writes the defaults.
    "prompts": ("prompts.npz", "anti-sus prompts add NAME --reject TEXT --accept TEXT --models DIR"),
    # CLIP's text tower and its BPE vocabulary (anti_sus.text): text search and prompt stages.
    "clip_text": ("clip_text.onnx", "python -m models.export_clip --out DIR --pretrained openai --only-text"),
    "clip_vocab": ("bpe_simple_vocab_16e6.txt.gz", "python -m models.export_clip --out DIR --pretrained openai --only-text"),
    "clip_text_int8": ("clip_text.int8.onnx", "python -m models.export_clip --out DIR --pretrained openai --only-text"),
}
REQUIRED = ("clip", "gmm", "gmm_meta")

# Pipeline stages a manifest's ``"pipeline"`` list may name, in the order they run by default, each with the
# artifacts it needs. A stage module adds itself with :func:`register_stage` (so a new stage plugs in by name).
STAGES: dict[str, tuple[str, ...]] = {
    "clip": ("clip",),
    "gmm": ("gmm", "gmm_meta"),
    "probe": ("probe",),
    "prompts": ("prompts",),
    "watermark": ("watermark",),
}
DEFAULT_PIPELINE = ("clip", "gmm", "probe", "prompts", "watermark")
"""The order of a manifest without a ``"pipeline"`` list (optional stages run when their artifacts are there)."""


def register_stage(name: str, artifacts: Sequence[str] = ()) -> None:
    """Make ``name`` a stage a manifest's ``"pipeline"`` list may name; ``artifacts``: what it needs in the directory."""
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"stage name {name!r} must be letters, digits and underscores")
    STAGES[name] = tuple(artifacts)


def pipeline_of(manifest: Mapping[str, Any], directory: str | os.PathLike[str] = "") -> list[str] | None:
    """The manifest's ordered stage list (None when it has none: the default order); refuses a bad one.

    ``clip`` must be there and first (every other stage reads its features or its
    survivors), names must be known (:data:`STAGES`) and not repeated.
    """
    if "pipeline" not in manifest:
        return None
    where = f"{Path(directory) / MANIFEST}" if directory else MANIFEST
    order = manifest["pipeline"]
    if not isinstance(order, list) or not all(isinstance(x, str) for x in order):
        raise ModelDirError(f"{where}: \"pipeline\" must be a list of stage names, got {order!r}")
    unknown = [x for x in order if x not in STAGES]
    if unknown:
        raise ModelDirError(f"{where}: unknown pipeline stage(s) {', '.join(map(repr, unknown))}; "
                            f"known stages: {', '.join(STAGES)}")
    if len(set(order)) != len(order):
        raise ModelDirError(f"{where}: a stage is listed twice in \"pipeline\": {order}")
    if not order or order[0] != "clip":
        raise ModelDirError(f"{where}: \"pipeline\" must start with \"clip\" (every other stage uses its features), got {order}")
    return list(order)


def pipeline_required(order: Sequence[str] | None) -> tuple[str, ...]:
    """Artifacts a stage list needs (the default order: :data:`REQUIRED`)."""
    if order is None:
        return REQUIRED
    return tuple(a for stage in order for a in STAGES[stage])


def manifest_hash(directory: str | os.PathLike[str]) -> str:
    """sha256 of ``manifest.json`` (which names every artifact's sha256): what a reload swapped to."""
    return sha256_file(Path(directory) / MANIFEST)
TINY_HINT = "python -m models.tiny --out DIR  (small random models for tests and the offline demo)"


class ModelDirError(Exception):
    """The model directory cannot be used; the message says what to run."""


@dataclass(frozen=True)
class Artifact:
    """One manifest entry with its resolved path."""

    name: str
    path: Path
    entry: Mapping[str, Any]

    @property
    def sha256(self) -> str:
        return str(self.entry["sha256"])


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_hint(name: str, directory: str | os.PathLike[str]) -> str:
    """The command that builds artifact ``name`` into ``directory``."""
    cmd = ARTIFACTS.get(name, ("", "python -m models.tiny --out DIR"))[1]
    return cmd.replace("DIR", str(directory))


def _safe_relpath(directory: Path, file: Any) -> Path:
    if not isinstance(file, str) or not file or os.path.isabs(file) or ".." in Path(file).parts:
        raise ModelDirError(f"manifest entry has an unsafe file name: {file!r}")
    return directory / file


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``manifest.json``; a missing or malformed one raises :class:`ModelDirError`."""
    d = Path(directory)
    path = d / MANIFEST
    if not path.is_file():
        raise ModelDirError(
            f"no {MANIFEST} in model directory {d}. Build the models first:\n"
            f"  {build_hint('clip', d)}\n  {build_hint('gmm', d)}\n  or: {TINY_HINT.replace('DIR', str(d))}"
        )
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("artifacts"), dict):
        raise ModelDirError(f"{path} is not a format-{FORMAT} manifest")
    return manifest


def verify(directory: str | os.PathLike[str], required: Iterable[str] = REQUIRED) -> list[str]:
    """Check every artifact's presence and sha256; return problems, each naming its file.

    An empty list means the directory is good. Required artifacts missing from
    the manifest are problems too, each with the command that builds it.
    """
    d = Path(directory)
    manifest = read_manifest(d)
    problems: list[str] = []
    arts: dict[str, Any] = manifest["artifacts"]
    for name in required:
        if name not in arts:
            problems.append(f"{name}: missing from {MANIFEST}; build it with: {build_hint(name, d)}")
    for name, entry in sorted(arts.items()):
        try:
            path = _safe_relpath(d, entry.get("file") if isinstance(entry, dict) else None)
        except ModelDirError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if not path.is_file():
            problems.append(f"{name}: file {path} is missing; build it with: {build_hint(name, d)}")
            continue
        actual = sha256_file(path)
        if actual != entry.get("sha256"):
            problems.append(
                f"{name}: file {path} does not match the manifest (sha256 {actual[:12]}… != {str(entry.get('sha256'))[:12]}…): "
                f"tampered or rebuilt without updating the manifest; rebuild it with: {build_hint(name, d)}"
            )
    return problems


def open_model_dir(directory: str | os.PathLike[str], required: Iterable[str] = REQUIRED) -> dict[str, Artifact]:
    """Verify the directory and return its artifacts by name; raise with a clear message if unusable."""
    d = Path(directory)
    problems = verify(d, required)
    if problems:
        raise ModelDirError(f"model directory {d} is not usable:\n  " + "\n  ".join(problems))
    arts = read_manifest(d)["artifacts"]
    return {name: Artifact(name, _safe_relpath(d, e["file"]), e) for name, e in arts.items()}


def artifact_entry(directory: str | os.PathLike[str], file: str, **fields: Any) -> dict[str, Any]:
    """A manifest entry for ``file`` (inside ``directory``) with its sha256 and size filled in."""
    path = _safe_relpath(Path(directory), file)
    return {"file": file, "sha256": sha256_file(path), "bytes": path.stat().st_size, **fields}


def write_manifest(directory: str | os.PathLike[str], artifacts: Mapping[str, Mapping[str, Any]], merge: bool = True) -> Path:
    """Write ``manifest.json`` atomically; with ``merge`` existing entries not named are kept."""
    d = Path(directory)
    current: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if (d / MANIFEST).is_file():
        try:
            old = read_manifest(d)
        except ModelDirError:
            if merge:
                raise
            old = {}
        if merge:
            current = dict(old["artifacts"])
        extra = {k: v for k, v in old.items() if k == "pipeline"}  # the stage list survives tools that rewrite artifacts
    current.update({k: dict(v) for k, v in artifacts.items()})
    data = json.dumps({"format": FORMAT, "artifacts": current, **extra}, indent=2, sort_keys=True) + "\n"
    # 0644: the server may run as another user (containers).
    atomic_write(d / MANIFEST, data.encode("utf-8"), mode=0o644)
    return d / MANIFEST


def write_pipeline(directory: str | os.PathLike[str], order: Sequence[str] | None) -> Path:
    """Set (or, with None, remove) the manifest's ordered stage list, atomically; a bad list is refused first."""
    d = Path(directory)
    manifest = read_manifest(d)
    if order is None:
        manifest.pop("pipeline", None)
    else:
        manifest["pipeline"] = list(order)
        pipeline_of(manifest, d)
    data = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(d / MANIFEST, data.encode("utf-8"), mode=0o644)
    return d / MANIFEST


def int8_unusable(arts: Mapping[str, Any], name: str = "clip_int8", base: str = "clip") -> str:
    """Why the int8 variant ``name`` must not be served by default ("" when it may).

    It may when its gate passed, it was quantized from the ``base`` now in the
    directory, and (for CLIP) the gate checked the decisions of the GMM now in
    the directory: a refitted GMM or a re-exported CLIP makes the check stale.
    ``arts`` maps names to manifest entries or :class:`Artifact`.
    """
    def entry(n: str) -> Mapping[str, Any]:
        a = arts.get(n)
        return a.entry if isinstance(a, Artifact) else (a or {})

    e = entry(name)
    if not e:
        return f"no {name} artifact"
    prov = e.get("provenance") or {}
    gate = prov.get("gate") if isinstance(prov.get("gate"), dict) else None
    if gate is None:
        return f"{name} has no int8 gate report (built by an older tool)"
    if gate.get("passed") is not True:
        return f"{name} did not pass the int8 gate"
    if prov.get("fp32_sha256") != entry(base).get("sha256"):
        return f"{name} was quantized from another {base} model"
    if base == "clip":
        gmm_sha = entry("gmm").get("sha256")
        checked = [d for d in gate.get("decisions") or [] if isinstance(d, dict) and d.get("name") == "gmm"]
        if not checked:
            return f"the int8 gate of {name} did not check GMM decisions (no GMM at export time)"
        if checked[0].get("gmm_sha256") != gmm_sha:
            return f"the int8 gate of {name} checked another GMM (refitted since)"
    return ""
