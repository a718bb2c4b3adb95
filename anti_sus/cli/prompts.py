"""``anti-sus prompts``: list, add, remove, enable, disable and re-threshold a model directory's prompt checks.

Works without torch: new prompts are encoded with the directory's ONNX text
tower (``clip_text``) and the torch-free tokenizer; ``prompts.npz`` and the
manifest are each replaced atomically. A running server picks the change up on
restart (or ``anti-sus reload`` where available).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from photocore.errors import UserError
from photocore.paths import DEFAULT_MODELS_DIR, models_dir
from photocore.settings import probability

from .options import add_logging, settings

ACTIONS = ("list", "add", "remove", "enable", "disable", "set")


def add_prompts(sub: Any) -> None:
    p = sub.add_parser("prompts", help="list, add, remove, enable/disable or re-threshold the zero-shot prompt checks "
                       "(prompts.npz) of a model directory, without torch")
    s = settings(p)
    p.add_argument("action", choices=ACTIONS, help="list: show every check; add: encode a new check (or replace one "
                   "with --replace); remove/enable/disable: by NAME; set: change NAME's --threshold")
    p.add_argument("name", nargs="?", help="check name (a-z 0-9 - _; its verdict is prompt:NAME)")
    s.add("--models", default=DEFAULT_MODELS_DIR, type=Path, help="model directory (needs clip_text and clip_vocab to add)")
    s.add("--reject", env="PROMPTS_REJECT", many=True, sep="|", default=[],
          help="add: a prompt describing images to reject (repeat the flag)")
    s.add("--accept", env="PROMPTS_ACCEPT", many=True, sep="|", default=[],
          help="add: a prompt describing images to keep (repeat the flag)")
    s.add("--threshold", env="PROMPTS_THRESHOLD", type=probability, default=None,
          help="add/set: reject when P(reject) >= this (add without it: 0.5)")
    s.switch("--enabled", env="PROMPTS_ENABLED", default=True, help="add: the new check is on (--no-enabled: present but off)")
    s.switch("--replace", env="PROMPTS_REPLACE", help="add: replace a check of the same name instead of refusing")
    add_logging(p)


def _need_name(args: argparse.Namespace) -> str:
    from ..stages.prompts import PromptFileError, check_name

    if not args.name:
        raise UserError(f"prompts {args.action}: give the check's NAME")
    try:
        return check_name(args.name)
    except PromptFileError as exc:
        raise UserError(str(exc)) from None


def _format(checks: Any) -> str:
    if checks is None or not checks.names:
        return "no prompt checks"
    lines = []
    for c in checks.specs():
        lines.append(f"{c.name:16s} {'on ' if c.enabled else 'off'}  threshold {c.threshold:.3f}  verdict prompt:{c.name}")
        lines += [f"    reject: {t}" for t in c.reject] + [f"    accept: {t}" for t in c.accept]
    return "\n".join(lines)


def cmd_prompts(args: argparse.Namespace) -> int:
    from ..stages.prompts import CheckSpec, PromptChecks, PromptFileError, directory_encoder, load_dir, save_dir

    d = models_dir(args.models)
    try:
        checks = load_dir(d)
    except PromptFileError as exc:
        raise UserError(str(exc)) from None
    if args.action == "list":
        print(_format(checks))
        return 0
    name = _need_name(args)
    specs = checks.specs() if checks is not None else []
    names = [c.name for c in specs]
    if args.action == "add":
        reject = [t.strip() for t in args.reject if t.strip()]
        accept = [t.strip() for t in args.accept if t.strip()]
        if not reject or not accept:
            raise UserError("prompts add: give at least one non-empty --reject and one non-empty --accept prompt")
        if name in names and not args.replace:
            raise UserError(f"prompts add: check {name!r} exists; pass --replace to replace it, or remove it first")
        new = CheckSpec(name, tuple(reject), tuple(accept), 0.5 if args.threshold is None else args.threshold, args.enabled)
        specs = [new if c.name == name else c for c in specs] if name in names else [*specs, new]
        encode, text_sha, clip_sha = directory_encoder(d)  # ModelDirError (one line) without a text tower
        try:
            checks = (checks.replaced(specs, encode, text_sha, clip_sha) if checks is not None else
                      PromptChecks.encode(specs, encode, feature_model_sha256=clip_sha, text_model_sha256=text_sha))
        except PromptFileError as exc:
            raise UserError(str(exc)) from None
    else:
        if name not in names:
            raise UserError(f"prompts {args.action}: no check {name!r} in {d} (it has: {', '.join(names) or 'none'})")
        if args.action == "set" and args.threshold is None:
            raise UserError("prompts set: give --threshold")
        if args.action == "remove":
            specs = [c for c in specs if c.name != name]
        else:
            specs = [CheckSpec(c.name, c.reject, c.accept,
                               args.threshold if args.action == "set" else c.threshold,
                               {"enable": True, "disable": False}.get(args.action, c.enabled))
                     if c.name == name else c for c in specs]
        assert checks is not None
        checks = checks.replaced(specs)  # no new prompt: the stored embeddings are reused
    save_dir(d, checks, f"anti-sus prompts {args.action}")
    print(f"{args.action} {name}: {d / 'prompts.npz'} and manifest updated")
    print(_format(checks))
    return 0
