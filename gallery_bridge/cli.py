"""``gallery-bridge``: serve, web, import, list, rebuild, ping, info.

Every flag can also be set by an environment variable (shown in ``--help``),
so the service can be configured in a container without a command line.
Secrets (the scenery password) come only from the environment or a file.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
import uuid
from typing import Sequence

from photocore.blas import single_threaded_blas
from photocore.errors import UserError, report_failure
from photocore.redact import install as install_redaction
from photocore.redact import redact
from photocore.settings import (Parser, Settings, bind_endpoint, endpoint, finite_float, non_negative_float, non_negative_int,
                                port_or_off, positive_float, positive_int)

from .wiring import ENV, _catalogue_path, _limits, check_target, curve_settings, open_ingester

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

log = logging.getLogger("gallery_bridge")


def _opt_float(text: str) -> float | None:
    """A finite number, or none/off for 'check disabled'."""
    return None if text.strip().lower() in ("", "none", "off") else finite_float(text)


_opt_float.__name__ = "number or none"


def _settings(p: argparse.ArgumentParser) -> Settings:
    return Settings(p, ENV)


def _target_flags(p: argparse.ArgumentParser) -> None:
    g = _settings(p).group("gallery target")
    g.add("--target", default="folder:./gallery", help="folder:PATH (embedded gallery) or scenery:URL")
    g.add("--ledger", default="./gallery_bridge_ledger.sqlite", help="scenery target: local SQLite of key -> scenery id (idempotency, dedup)")
    g.add("--scenery-password-file", help=f"file holding import_images_bot_password (or env {ENV}SCENERY_PASSWORD)")
    g.switch("--allow-insecure-scenery",
             help="accept a plain http:// scenery URL (the password then travels unencrypted; loopback included)")
    g.add("--scenery-tags", default='["from_nomad"]', help="JSON list of tags sent with every image")
    g.add("--scenery-timeout", default=60.0, type=positive_float, help="seconds to wait for scenery's answer")
    g.add("--scenery-retries", default=4, type=non_negative_int, help="retries on 5xx/timeouts (exponential backoff)")
    g.add("--page-limit", default=500, type=positive_int, help="folder target: entries shown on index.html (newest first)")
    d = _settings(p).group("duplicate detection")
    d.add("--phash-threshold", default=64, type=non_negative_int, help="Hamming distance on scenery's 576-bit phash (mirror included)")
    d.add("--crop-threshold", default=0.94, type=finite_float, help="band-pass correlation above which a border-cropped copy is a duplicate")
    d.add("--max-crop", default=0.04, type=non_negative_float, help="largest border crop (fraction per axis) the crop check tries; 0 disables it")
    d.add("--clip-threshold", type=_opt_float, help="cosine of CLIP features above which an image is a duplicate (off by default)")
    d.add("--have-threshold", default=3, type=non_negative_int,
          help="the have op answers 'near' within this Hamming distance on the 64-bit pHash, for items "
               "without the 576-bit phash (max 16)")
    lim = _settings(p).group("limits")
    lim.add("--max-image-bytes", default=50 * 1024 * 1024, type=positive_int, help="largest encoded image accepted")
    lim.add("--max-pixels", default=100_000_000, type=positive_int, help="largest image (width*height) decoded")
    lim.add("--min-side", default=64, type=positive_int, help="smaller images are answered 'rejected'")
    _settings(p).secret("SCENERY_PASSWORD", help="scenery's import_images_bot_password (or --scenery-password-file)")


def _log_flags(p: argparse.ArgumentParser) -> None:
    s = _settings(p)
    s.add("--log-format", default="text", choices=("text", "json"), help="text or json")
    s.add("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="DEBUG, INFO, WARNING, ERROR")


def _client_flags(p: argparse.ArgumentParser) -> None:
    s = _settings(p)
    # --server as well, so health checks read the same as `anti-sus ping --server …`.
    s.add("--connect", "--server", dest="connect", type=endpoint, default="tcp://127.0.0.1:7778", help="endpoint of a running gallery-bridge")
    s.add("--timeout", default=5.0, type=positive_float, help="seconds to wait for each try")
    s.add("--retries", default=1, type=non_negative_int, help="tries after the first")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; raises :class:`UserError` for a bad ``GALLERY_BRIDGE_…`` variable."""
    ap = Parser(prog="gallery-bridge", description="Ingest good images into a gallery exactly once, without duplicates.")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the ingest service (ZeroMQ ROUTER)")
    ss = _settings(s)
    ss.add("--bind", type=bind_endpoint, default="tcp://127.0.0.1:7778", help="ZeroMQ endpoint to bind")
    ss.add("--metrics-port", default=0, type=port_or_off, help="serve Prometheus metrics on this port (0: off)")
    ss.add("--curve-secret-file", "--curve-secret-key", dest="curve_secret_file",
           help="the server's CURVE secret key: the NAME.key_secret file of `anti-sus keygen` (or a bare Z85 secret); "
                "encrypts the socket")
    ss.add("--curve-allow", help="directory of the public .key files of the clients allowed in (needs --curve-secret-file "
           "as a keygen file); without it any client that knows the server key is served")
    ss.add("--instance", type=_instance, shown="a fresh uuid4 hex per start",
           help="token reported with the pid in ping/info, so a launcher knows it talks to its own child")
    rv = _settings(s).group("review and labels")
    rv.add("--review-keep", default=5000, type=positive_int,
           help="review items (rejected images sent for review) kept, newest first; older ones and their files are deleted")
    rv.add("--label-copies", default=20000, type=positive_int,
           help="copies of labelled images kept for `labels export` (removed gallery images, review items), newest first")
    _target_flags(s)
    _log_flags(s)
    i = sub.add_parser("import", help="bulk add a folder of images (same dedup as serve)")
    i.add_argument("dir", type=Path, help="folder to import (recursively)")
    _target_flags(i)
    _log_flags(i)
    ls = sub.add_parser("list", help="show recent entries")
    _settings(ls).add("-n", env="LIST_N", default=20, type=positive_int, help="how many")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    _target_flags(ls)
    _log_flags(ls)
    r = sub.add_parser("rebuild", help="regenerate thumbnails, index.html and hashes from the catalogue")
    _target_flags(r)
    _log_flags(r)
    _web_parser(sub)
    lb = sub.add_parser("labels", help="labels given in the gallery (good/bad)")
    lbs = lb.add_subparsers(dest="labels_command", required=True)
    ex = lbs.add_parser("export", help="write DIR/good/, DIR/bad/ and DIR/labels.npz for anti-sus tune and learn")
    ex.add_argument("dir", type=Path, help="new (or empty) folder to write")
    _settings(ex).add("--gallery", type=Path, default=Path("./gallery"),
                      help="folder gallery (holding catalogue.sqlite), or the catalogue/ledger file itself")
    _log_flags(ex)
    for name, text in (("ping", "check that a service answers (exit 0 when it does)"), ("info", "print a service's configuration")):
        c = sub.add_parser(name, help=text)
        _client_flags(c)
        if name == "ping":
            c.add_argument("--json", action="store_true", help="print the raw JSON reply instead of one line")
    return ap


def _web_parser(sub: argparse._SubParsersAction) -> None:
    """``gallery-bridge web``: its flags are ``GALLERY_BRIDGE_WEB_…`` variables too."""
    w = sub.add_parser("web", help="serve the gallery as a web app (browse, search, review, labels)",
                       description="Serve the gallery as a web app. Reads the catalogue read-only; labels go to the "
                                   "running `gallery-bridge serve` at --connect.")
    ws = Settings(w, ENV + "WEB_")
    ws.add("--gallery", type=Path, default=Path("gallery"), help="the gallery folder (serve's folder: target)")
    ws.add("--bind", default="127.0.0.1:8780", help="HOST:PORT to listen on; a non-loopback host needs a token")
    ws.add("--connect", type=endpoint, default="tcp://127.0.0.1:7778",
           help="endpoint of the running gallery-bridge serve (labels are written by it)")
    ws.add("--models", type=Path, help="model directory with the CLIP towers, for search (none: search is off)")
    ws.add("--max-upload-bytes", type=positive_int, default=20 * 1024 * 1024, help="largest file accepted by 'more like a file'")
    ws.add("--max-upload-pixels", type=positive_int, default=40_000_000, help="largest uploaded image (width*height) decoded")
    ws.add("--threads", type=positive_int, default=8, help="requests served at once")
    ws.add("--timeout", type=positive_float, default=10.0, help="seconds to wait for serve's answer to a label")
    ws.switch("--create-token", default=False,
              help="when GALLERY_BRIDGE_WEB_TOKEN_FILE names a file that does not exist, write a fresh random token there")
    ws.secret("TOKEN", help="the token asked for when --bind is not a loopback address (at least 16 characters)")
    _log_flags(w)


def _instance(text: str) -> str:
    """The ``--instance`` token: 1-128 printable characters (it travels in health replies and log lines)."""
    if not text or len(text) > 128 or not text.isprintable():
        raise argparse.ArgumentTypeError(f"must be 1-128 printable characters, got {text[:40]!r}")
    return text


def cmd_serve(args: argparse.Namespace) -> int:
    single_threaded_blas()
    import zmq

    from photocore.observe import start_metrics
    from photocore.curve import CurveKeyError

    from .server import Server, ServerConfig

    curve = curve_settings(args.curve_secret_file, args.curve_allow)
    instance = args.instance or uuid.uuid4().hex
    ingester = open_ingester(args)
    try:
        try:
            server = Server(ingester, ServerConfig(bind=args.bind, limits=_limits(args), instance=instance,
                                                   review_keep=args.review_keep, label_copies=args.label_copies, **curve))
        except CurveKeyError as exc:
            raise UserError(str(exc)) from None
        except zmq.ZMQError as exc:
            raise UserError(f"cannot bind {args.bind}: {exc}") from None
        try:
            try:
                start_metrics(args.metrics_port)
            except OSError as exc:
                raise UserError(f"cannot serve metrics on port {args.metrics_port}: {exc}") from None
            server.install_signal_handlers()
            server.run()
        finally:
            server.close()
    finally:
        ingester.close()
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from photocore.protocol import ProtocolError

    from .targets import TargetError
    from .validate import Meta, check_image

    root: Path = args.dir
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    check_target(args)  # a wrong target is the first thing to hear about
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        # An import that finds nothing is almost always a wrong path: say so, and fail.
        raise UserError(f"no images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)", status=1)
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


def cmd_labels(args: argparse.Namespace) -> int:
    """``labels export``: read-only on the catalogue, so it runs next to a live ``serve``."""
    from .label_export import export

    gallery: Path = args.gallery
    catalogue = gallery if gallery.is_file() else gallery / "catalogue.sqlite"
    counts = export(catalogue, args.dir)
    print(json.dumps({"dir": str(args.dir), **counts}))
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    import zmq

    from .client import GalleryUnavailable, IngestClient, IngestError

    try:
        with IngestClient(args.connect, timeout=args.timeout, retries=args.retries) as client:
            t0 = time.perf_counter()
            reply = client.ping() if args.command == "ping" else client.info()
            elapsed_ms = 1000 * (time.perf_counter() - t0)
    except zmq.ZMQError as exc:
        raise UserError(f"--connect {args.connect!r}: {exc}") from None
    except (GalleryUnavailable, IngestError) as exc:
        return report_failure("gallery-bridge", exc)
    if args.command == "ping" and not args.json:
        # One line, as `anti-sus ping` prints; --json gives the reply itself.
        print(f"pong from {args.connect} in {elapsed_ms:.1f} ms (gallery_bridge {reply.get('version', '?')}, "
              f"pid {reply.get('pid', '?')}, instance {reply.get('instance', '?')})")
    else:
        print(json.dumps(reply, indent=None if args.command == "ping" else 2))
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    from .web.app import WebConfig
    from .web.serve import resolve_token, run

    cfg = WebConfig(gallery=args.gallery, connect=args.connect, models=args.models, token=resolve_token(args.create_token),
                    max_upload_bytes=args.max_upload_bytes, max_upload_pixels=args.max_upload_pixels, timeout=args.timeout)
    run(cfg, args.bind, threads=args.threads)
    return 0


COMMANDS = {"web": cmd_web, "serve": cmd_serve, "import": cmd_import, "list": cmd_list, "rebuild": cmd_rebuild, "labels": cmd_labels, "ping": cmd_client, "info": cmd_client}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if hasattr(args, "log_format"):
            from photocore.observe import setup_logging

            setup_logging(args.log_format, args.log_level)
            # Every log line, at any level and from any library, goes through the redaction.
            install_redaction()
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"gallery-bridge: {redact(str(exc))}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
