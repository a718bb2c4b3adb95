"""Write or verify a model directory's ``manifest.json``.

    python -m models.manifest verify models      # exit 1 and name every missing/tampered file
    python -m models.manifest write models       # re-hash the files of the existing entries
    python -m models.manifest show models        # one line per artifact
    python -m models.manifest pipeline models clip gmm watermark   # the ordered stages (no args: print; 'default': reset)

``write`` keeps every entry's input/preprocess/provenance and refreshes
``sha256``/``bytes`` from the files on disk; it adds entries for known artifact
files (``clip_visual.onnx``, ``gmm.npz``, …) that are present but unlisted, with
what can be read from the file itself. Use it after moving or legitimately
replacing a file; the build commands write the manifest themselves.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

from anti_sus.modeldir import (ARTIFACTS, DEFAULT_PIPELINE, MANIFEST, REQUIRED, ModelDirError, artifact_entry, pipeline_of,
                              read_manifest, verify, write_manifest, write_pipeline)

from ._cli import EnvParser, UserError, run_main, setup


def verified(out: Path, what: str, started: float) -> Path:
    """``out`` once :func:`verify` finds nothing wrong (else ModelDirError naming every problem); logs the build time."""
    problems = verify(out)
    if problems:
        raise ModelDirError(f"{what} failed verification:\n  " + "\n  ".join(problems))
    logging.getLogger("models").info("%s %s built in %.1f s", what, out, time.monotonic() - started)
    return out


def _describe_new(directory: Path, name: str, file: str) -> dict[str, Any]:
    """A minimal entry for an unlisted artifact file, from what the file says about itself."""
    fields: dict[str, Any] = {"kind": file.rsplit(".", 1)[-1], "provenance": {"tool": "models.manifest write (entry added afterwards)"}}
    if file.endswith(".onnx"):
        import onnx

        m = onnx.load(str(directory / file), load_external_data=False)
        inp, out = m.graph.input[0], m.graph.output[0]
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        odims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type).name  # int64 for clip_text
        fields.update(kind="onnx", input={"name": inp.name, "shape": dims, "dtype": dtype},
                      output={"name": out.name, "shape": odims})
    elif file.endswith(".npz"):
        # anti-sus learn's probe.npz, the prompt checks' prompts.npz, fit_gmm's gmm.npz
        fields["kind"] = name if name in ("probe", "prompts") else "gmm"
    elif file.endswith(".txt.gz"):
        fields["kind"] = "bpe"  # clip_vocab: open_clip's merge list (anti_sus.text.tokenizer)
    return fields


def write(directory: Path, required: Sequence[str] = REQUIRED) -> list[str]:
    """Refresh hashes of listed artifacts, add present unlisted ones; returns the names written."""
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    try:
        current = read_manifest(directory)["artifacts"] if (directory / MANIFEST).is_file() else {}
    except ModelDirError as exc:
        raise UserError(str(exc)) from None
    entries: dict[str, Any] = {}
    for name, entry in current.items():
        file = entry.get("file", "")
        if not (directory / file).is_file():
            raise UserError(f"{name}: file {directory / file} is missing; rebuild it or remove the entry")
        fields = {k: v for k, v in entry.items() if k not in ("file", "sha256", "bytes")}
        entries[name] = artifact_entry(directory, file, **fields)
    for name, (file, _) in ARTIFACTS.items():
        if name not in entries and (directory / file).is_file():
            entries[name] = artifact_entry(directory, file, **_describe_new(directory, name, file))
    if not entries:
        raise UserError(f"no known artifact files in {directory} ({', '.join(f for f, _ in ARTIFACTS.values())})")
    write_manifest(directory, entries, merge=False)
    return sorted(entries)


def _pipeline(directory: Path, stages: Sequence[str]) -> int:
    """Print the stage list, set it (checked: known names, clip first) or remove it (``default``)."""
    try:
        if stages:
            write_pipeline(directory, None if list(stages) == ["default"] else stages)
        order = pipeline_of(read_manifest(directory), directory)
    except ModelDirError as exc:
        print(f"error: {exc}")
        return 1
    print(" ".join(order) if order else f"default order: {' '.join(DEFAULT_PIPELINE)} (optional stages when built)")
    return 0


def parser() -> EnvParser:
    p = EnvParser("manifest", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["verify", "write", "show", "pipeline"],
                   help="what to do (pipeline: print, set or reset the ordered stage list)")
    p.add_argument("directory", type=Path, help="model directory")
    p.add_argument("stages", nargs="*",
                   help="with pipeline: the stages in order, e.g. clip gmm probe watermark ('default': remove the list)")
    p.add_env("--required", default=",".join(REQUIRED), help="comma-separated artifacts that must be present")
    p.add_common()
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup(args, torch_threads=False)
    required = [r for r in args.required.split(",") if r]
    if args.stages and args.action != "pipeline":
        print(f"error: stage names are only for the pipeline action, not {args.action}")
        return 2
    if args.action == "pipeline":
        return _pipeline(args.directory, args.stages)
    if args.action == "write":
        names = write(args.directory, required)
        print(f"wrote {args.directory / MANIFEST}: {', '.join(names)}")
        return 0
    try:
        problems = verify(args.directory, required)
        arts = read_manifest(args.directory)["artifacts"]
    except ModelDirError as exc:
        print(f"error: {exc}")
        return 1
    if args.action == "show":
        for name, e in sorted(arts.items()):
            prov = e.get("provenance", {})
            gate = prov.get("gate") if isinstance(prov.get("gate"), dict) else None
            # An int8 entry's headline is its gate report (docs/models.md), not the fp32 export parity.
            figures = (f"int8 gate {'passed' if gate.get('passed') else 'FAILED'}: {gate.get('method')}, "
                       f"{gate.get('speedup')}x fp32, cosine min {gate.get('cosine_min')}, agreement "
                       f"{json.dumps(gate.get('agreement'))}" if gate else json.dumps(prov.get("parity", "")))
            print(f"{name:14s} {e.get('file')}  {e.get('bytes')} bytes  sha256 {str(e.get('sha256'))[:12]}…  "
                  f"{prov.get('arch', prov.get('tool', ''))} {figures}")
    if problems:
        print(f"{args.directory}: {len(problems)} problem(s)")
        for line in problems:
            print(f"  {line}")
        return 1
    if args.action == "verify":
        print(f"{args.directory}: OK ({', '.join(sorted(arts))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
