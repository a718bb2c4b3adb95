"""``gallery-bridge``: serve, import, list, rebuild, ping, info.

Every flag can also be set by an environment variable (shown in ``--help``),
so the service can be configured in a container without a command line.
Secrets (the scenery password) come only from the environment or a file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

ENV = "GALLERY_BRIDGE_"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

log = logging.getLogger("gallery_bridge")


class UserError(Exception):
    """A problem the user can fix: printed as one line, exit status 2."""


def _env(name: str, default: Any, cast: Callable[[str], Any] = str) -> Any:
    raw = os.environ.get(ENV + name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        raise UserError(f"environment variable {ENV}{name}={raw!r} is not a valid {cast.__name__}") from None


def _opt_float(text: str) -> float | None:
    return None if text.lower() in ("", "none", "off") else float(text)


def _add(p: argparse.ArgumentParser, flag: str, env: str, default: Any, help: str, cast: Callable[[str], Any] = str, **kw: Any) -> None:
    p.add_argument(flag, default=_env(env, default, cast), type=cast, help=f"{help} [env {ENV}{env}; default {default}]", **kw)


def _target_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gallery target")
    _add(g, "--target", "TARGET", "folder:./gallery", "folder:PATH (embedded gallery) or scenery:URL")
    _add(g, "--ledger", "LEDGER", "./gallery_bridge_ledger.sqlite", "scenery target: local SQLite of key -> scenery id (idempotency, dedup)")
    _add(g, "--scenery-password-file", "SCENERY_PASSWORD_FILE", None, f"file holding import_images_bot_password (or env {ENV}SCENERY_PASSWORD)")
    _add(g, "--scenery-tags", "SCENERY_TAGS", '["from_nomad"]', "JSON list of tags sent with every image")
    _add(g, "--scenery-timeout", "SCENERY_TIMEOUT", 60.0, "seconds to wait for scenery's answer", float)
    _add(g, "--scenery-retries", "SCENERY_RETRIES", 4, "retries on 5xx/timeouts (exponential backoff)", int)
    _add(g, "--page-limit", "PAGE_LIMIT", 500, "folder target: entries shown on index.html (newest first)", int)
    d = p.add_argument_group("duplicate detection")
    _add(d, "--phash-threshold", "PHASH_THRESHOLD", 64, "Hamming distance on scenery's 576-bit phash (mirror included)", int)
    _add(d, "--crop-threshold", "CROP_THRESHOLD", 0.94, "band-pass correlation above which a border-cropped copy is a duplicate", float)
    _add(d, "--max-crop", "MAX_CROP", 0.04, "largest border crop (fraction per axis) the crop check tries; 0 disables it", float)
    _add(d, "--clip-threshold", "CLIP_THRESHOLD", None, "cosine of CLIP features above which an image is a duplicate (off by default)", _opt_float)
    lim = p.add_argument_group("limits")
    _add(lim, "--max-image-bytes", "MAX_IMAGE_BYTES", 50 * 1024 * 1024, "largest encoded image accepted", int)
    _add(lim, "--max-pixels", "MAX_PIXELS", 100_000_000, "largest image (width*height) decoded", int)
    _add(lim, "--min-side", "MIN_SIDE", 64, "smaller images are answered 'rejected'", int)


def _log_flags(p: argparse.ArgumentParser) -> None:
    _add(p, "--log-format", "LOG_FORMAT", "text", "text or json", choices=("text", "json"))
    _add(p, "--log-level", "LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING, ERROR")


def _client_flags(p: argparse.ArgumentParser) -> None:
    # --server as well, so health checks read the same as `anti-sus ping --server …`.
    p.add_argument("--connect", "--server", dest="connect", default=_env("CONNECT", "tcp://127.0.0.1:7778"),
                   help=f"endpoint of a running gallery-bridge [env {ENV}CONNECT; default tcp://127.0.0.1:7778]")
    _add(p, "--timeout", "TIMEOUT", 5.0, "seconds to wait for each try", float)
    _add(p, "--retries", "RETRIES", 1, "tries after the first", int)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gallery-bridge", description="Ingest good images into a gallery exactly once, without duplicates.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the ingest service (ZeroMQ ROUTER)")
    _add(s, "--bind", "BIND", "tcp://127.0.0.1:7778", "ZeroMQ endpoint to bind")
    _add(s, "--metrics-port", "METRICS_PORT", 0, "serve Prometheus metrics on this port (0: off)", int)
    _add(s, "--curve-secret-file", "CURVE_SECRET_FILE", None, "file with the server's Z85 CURVE secret key (encrypts the socket)")
    _target_flags(s)
    _log_flags(s)
    i = sub.add_parser("import", help="bulk add a folder of images (same dedup as serve)")
    i.add_argument("dir", type=Path, help="folder to import (recursively)")
    _target_flags(i)
    _log_flags(i)
    ls = sub.add_parser("list", help="show recent entries")
    _add(ls, "-n", "LIST_N", 20, "how many", int)
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    _target_flags(ls)
    _log_flags(ls)
    r = sub.add_parser("rebuild", help="regenerate thumbnails, index.html and hashes from the catalogue")
    _target_flags(r)
    _log_flags(r)
    for name, text in (("ping", "check that a service answers (exit 0 when it does)"), ("info", "print a service's configuration")):
        c = sub.add_parser(name, help=text)
        _client_flags(c)
    return ap


# ---- wiring ----------------------------------------------------------------------

def _password(args: argparse.Namespace) -> str:
    if args.scenery_password_file:
        try:
            pw = Path(args.scenery_password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UserError(f"cannot read --scenery-password-file: {exc}") from None
    else:
        pw = os.environ.get(ENV + "SCENERY_PASSWORD", "")
    if not pw:
        raise UserError(f"the scenery target needs import_images_bot_password: set {ENV}SCENERY_PASSWORD or --scenery-password-file")
    return pw


def _catalogue_path(args: argparse.Namespace) -> tuple[str, str, Path]:
    from .targets import parse_target

    try:
        kind, rest = parse_target(args.target)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return kind, rest, (Path(rest) / "catalogue.sqlite" if kind == "folder" else Path(args.ledger))


def open_ingester(args: argparse.Namespace):  # -> Ingester
    """Catalogue + target + indexes from the common flags (takes the writer lock, runs crash recovery)."""
    from .catalogue import Catalogue
    from .dedup import DedupConfig
    from .ingest import Ingester, crash_hook
    from .lock import GalleryLocked

    kind, rest, _ = _catalogue_path(args)
    cfg = DedupConfig(phash_threshold=args.phash_threshold, crop_correlation=args.crop_threshold,
                      max_crop=args.max_crop, clip_threshold=args.clip_threshold)
    if not 0 <= cfg.max_crop <= 0.2:
        raise UserError("--max-crop must be between 0 and 0.2")
    if kind == "folder":
        from .targets.folder import FolderTarget

        target = FolderTarget(Path(rest), page_limit=args.page_limit, crash=crash_hook())
        catalogue = Catalogue(target.catalogue_path)
    else:
        from .targets.scenery import SceneryTarget

        if not rest.startswith(("http://", "https://")):
            raise UserError(f"scenery target needs an http(s) URL, got {rest!r}")
        try:
            tags = json.loads(args.scenery_tags)
        except ValueError:
            tags = None
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise UserError(f"--scenery-tags must be a JSON list of strings, got {args.scenery_tags!r}")
        target = SceneryTarget(rest, _password(args), tags=tags, timeout=args.scenery_timeout, retries=args.scenery_retries)
        catalogue = Catalogue(Path(args.ledger))
    try:
        return Ingester(catalogue, target, cfg)
    except GalleryLocked as exc:
        catalogue.close()
        raise UserError(str(exc)) from None


def _limits(args: argparse.Namespace):
    from .validate import Limits

    return Limits(max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels, min_side=args.min_side)


def cmd_serve(args: argparse.Namespace) -> int:
    import zmq

    from anti_sus.observe import start_metrics

    from .server import Server, ServerConfig

    curve = None
    if args.curve_secret_file:
        try:
            curve = Path(args.curve_secret_file).read_bytes().strip()
        except OSError as exc:
            raise UserError(f"cannot read --curve-secret-file: {exc}") from None
    ingester = open_ingester(args)
    try:
        try:
            server = Server(ingester, ServerConfig(bind=args.bind, limits=_limits(args), curve_secret=curve))
        except zmq.ZMQError as exc:
            raise UserError(f"cannot bind {args.bind}: {exc}") from None
        try:
            start_metrics(args.metrics_port)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on port {args.metrics_port}: {exc}") from None
        server.install_signal_handlers()
        server.run()
    finally:
        ingester.close()
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from anti_sus.protocol import ProtocolError

    from .targets import TargetError
    from .validate import Meta, check_image

    root: Path = args.dir
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    limits = _limits(args)
    ingester = open_ingester(args)
    counts: dict[str, int] = {"added": 0, "duplicate": 0, "rejected": 0, "error": 0}
    try:
        for path in tqdm(files, desc="import", unit="img"):
            rel = path.relative_to(root).as_posix()
            try:
                data = path.read_bytes()
                key = f"file:{rel}"
                outcome = ingester.known(key, data) or ingester.ingest(
                    key, Meta(title=path.stem[:300], source="import"), check_image(data, limits), min_side=limits.min_side)
                counts[outcome.status] += 1
            except (ProtocolError, OSError) as exc:
                counts["error"] += 1
                log.warning("skipped %s: %s", rel, exc)
            except TargetError as exc:
                raise UserError(f"gallery unavailable: {exc}") from None
    finally:
        ingester.close()
    print(json.dumps({"files": len(files), **counts}))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .catalogue import Catalogue

    # Read-only and without recovery: a running service may be mid-ingest.
    _, _, path = _catalogue_path(args)
    try:
        catalogue = Catalogue(path, read_only=True)
    except FileNotFoundError:
        raise UserError(f"no gallery catalogue at {path}") from None
    try:
        for row in catalogue.recent(args.n):
            rec = {k: row[k] for k in ("id", "gallery_id", "added_at", "key", "ext", "width", "height", "title", "permalink", "source_url")}
            if args.json:
                print(json.dumps(rec))
            else:
                print(f"{rec['gallery_id']:>8}  {rec['added_at']}  {rec['width']}x{rec['height']}  {(rec['title'] or '')[:60]}  {rec['permalink'] or rec['source_url'] or ''}")
    finally:
        catalogue.close()
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .dedup import fingerprint
    from .ingest import coarse_to_int
    from .targets.folder import FolderTarget
    from .validate import Limits, check_image

    ingester = open_ingester(args)
    try:
        target = ingester.target
        if not isinstance(target, FolderTarget):
            raise UserError("rebuild works on a folder target (a scenery gallery keeps its own files)")
        cat = ingester.catalogue
        rows = cat.db.execute("SELECT id, ext FROM entries WHERE state='complete' ORDER BY id").fetchall()
        missing = 0
        limits = Limits(max_image_bytes=args.max_image_bytes, max_pixels=args.max_pixels)
        for row in tqdm(rows, desc="rebuild", unit="img"):
            path = target.image_path(row["id"], row["ext"])
            try:
                image = check_image(path.read_bytes(), limits)
            except Exception as exc:  # noqa: BLE001 - report and go on
                missing += 1
                log.error("entry %d: original unusable (%s)", row["id"], exc)
                continue
            fp = fingerprint(image.image)
            cat.update_hashes(row["id"], fp.phash_hex, coarse_to_int(fp), fp.signature)
            target.write_thumbnail(row["id"], image)
        target.write_page(cat)
    finally:
        ingester.close()
    print(json.dumps({"entries": len(rows), "unusable": missing}))
    return 1 if missing else 0


def cmd_client(args: argparse.Namespace) -> int:
    from .client import GalleryUnavailable, IngestClient, IngestError

    try:
        with IngestClient(args.connect, timeout=args.timeout, retries=args.retries) as client:
            reply = client.ping() if args.command == "ping" else client.info()
    except GalleryUnavailable as exc:
        print(f"gallery-bridge: {exc}", file=sys.stderr)
        return 1
    except IngestError as exc:
        print(f"gallery-bridge: error reply {exc}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=None if args.command == "ping" else 2))
    return 0


COMMANDS = {"serve": cmd_serve, "import": cmd_import, "list": cmd_list, "rebuild": cmd_rebuild, "ping": cmd_client, "info": cmd_client}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if hasattr(args, "log_format"):
            from anti_sus.observe import setup_logging

            setup_logging(args.log_format, args.log_level)
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"gallery-bridge: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
