"""Turning gallery-bridge's parsed flags into the objects its commands use: target, catalogue, ingester, CURVE.

Every mistake found here is a :class:`UserError` naming the flag (one line, exit 2).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from photocore.errors import UserError
from photocore.redact import register_secret, userinfo_secrets
from photocore.settings import read_secret

ENV = "GALLERY_BRIDGE_"


def _password(args: argparse.Namespace) -> str:
    if args.scenery_password_file:
        try:
            pw = Path(args.scenery_password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UserError(f"cannot read --scenery-password-file: {exc}") from None
    else:
        pw = read_secret(ENV + "SCENERY_PASSWORD") or ""
    if not pw:
        raise UserError(f"the scenery target needs import_images_bot_password: set {ENV}SCENERY_PASSWORD or --scenery-password-file")
    register_secret(pw)
    return pw


def _catalogue_path(args: argparse.Namespace) -> tuple[str, str, Path]:
    from .targets import parse_target

    try:
        kind, rest = parse_target(args.target)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return kind, rest, (Path(rest) / "catalogue.sqlite" if kind == "folder" else Path(args.ledger))


def check_target(args: argparse.Namespace) -> tuple[str, str]:
    """Parse ``--target`` and, for scenery, check its URL (https unless allowed); nothing is opened."""
    kind, rest, _ = _catalogue_path(args)
    if kind == "scenery":
        from .targets.scenery import check_url

        for secret in userinfo_secrets(rest):
            register_secret(secret)
        try:
            check_url(rest, args.allow_insecure_scenery)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    return kind, rest


def open_ingester(args: argparse.Namespace):  # -> Ingester
    """Catalogue + target + indexes from the common flags (takes the writer lock, runs crash recovery)."""
    from .catalogue import Catalogue
    from .dedup import DedupConfig
    from .ingest import Ingester, crash_hook
    from .lock import GalleryLocked

    kind, rest = check_target(args)
    cfg = DedupConfig(phash_threshold=args.phash_threshold, crop_correlation=args.crop_threshold,
                      max_crop=args.max_crop, clip_threshold=args.clip_threshold,
                      have_threshold=args.have_threshold)
    if not 0 <= cfg.max_crop <= 0.2:
        raise UserError("--max-crop must be between 0 and 0.2")
    if cfg.have_threshold > 16:  # a quarter of the bits: photos of one scene, even unrelated ones, answer "near"
        raise UserError("--have-threshold must be between 0 and 16")
    if kind == "folder":
        from .targets.folder import FolderTarget

        target = FolderTarget(Path(rest), page_limit=args.page_limit, crash=crash_hook())
        catalogue = Catalogue(target.catalogue_path)
    else:
        from .targets.scenery import SceneryTarget

        try:
            tags = json.loads(args.scenery_tags)
        except ValueError:
            tags = None
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise UserError(f"--scenery-tags must be a JSON list of strings, got {args.scenery_tags!r}")
        target = SceneryTarget(rest, _password(args), tags=tags, timeout=args.scenery_timeout, retries=args.scenery_retries,
                               allow_insecure=args.allow_insecure_scenery)
        catalogue = Catalogue(Path(args.ledger))
    try:
        return Ingester(catalogue, target, cfg)
    except GalleryLocked as exc:
        catalogue.close()
        raise UserError(str(exc)) from None


def _limits(args: argparse.Namespace):
    from .validate import Limits

    return Limits(max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels, min_side=args.min_side)


def curve_settings(secret_file: str | None, allow: str | None) -> dict[str, Any]:
    """Check the CURVE flags and turn them into ServerConfig fields; every mistake is one clear line.

    ``secret_file`` is a ZeroMQ certificate holding a secret (``anti-sus keygen``
    writes NAME.key_secret) or, as before, a bare Z85 secret key. ``allow`` is
    a directory of clients' public ``.key`` files.
    """
    from photocore.curve import CurveKeyError, check_allow_dir, read_key_file

    if allow and not secret_file:
        raise UserError("--curve-allow needs --curve-secret-file (the server's .key_secret file)")
    if not secret_file:
        return {}
    path = Path(secret_file)
    hint = "make a key pair with `anti-sus keygen DIR --name gallery`"
    if not path.is_file():
        raise UserError(f"--curve-secret-file {path}: no such file ({hint})")
    try:
        key = read_key_file(path, "--curve-secret-file", "secret")
    except CurveKeyError as exc:
        raise UserError(str(exc)) from None
    if key.bare is not None:
        if allow:
            raise UserError("--curve-allow needs the server key as a certificate file (the .key_secret of `anti-sus keygen`), "
                            "not a bare Z85 key")
        return {"curve_secret": key.bare}
    secret = key.secret
    if secret is None:
        raise UserError(f"--curve-secret-file {path} holds only a public key: pass the server's .key_secret file "
                        "(the public .key file is for the clients, e.g. nomad --gallery-server-key)")
    if not allow:
        return {"curve_secret_key": path}
    try:
        return {"curve_secret_key": path, "curve_allow": check_allow_dir(allow)}
    except CurveKeyError as exc:
        raise UserError(str(exc)) from None
