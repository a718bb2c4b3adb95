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
import time
from pathlib import Path
import uuid
from typing import Any, Callable, Sequence

from .redact import install as install_redaction
from .redact import redact, register_secret, userinfo_secrets

ENV = "GALLERY_BRIDGE_"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}

log = logging.getLogger("gallery_bridge")


class UserError(Exception):
    """A problem the user can fix: printed as one line, exit status 2 (or ``status``)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def _flag(text: str) -> bool:
    """An on/off environment value: 1/true/yes/on or 0/false/no/off."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(text)


_flag.__name__ = "boolean (1/0, true/false)"


def check_endpoint(value: str, flag: str) -> str:
    """A ZeroMQ endpoint must name its transport; ``127.0.0.1:7778`` alone is a common slip."""
    if "://" not in value:
        raise UserError(f"{flag} {value!r}: a ZeroMQ endpoint needs a transport, e.g. tcp://127.0.0.1:7778"
                        + (f" (did you mean tcp://{value}?)" if ":" in value else ""))
    return value


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
    g.add_argument("--allow-insecure-scenery", action="store_true", default=_env("ALLOW_INSECURE_SCENERY", False, _flag),
                   help="accept a plain http:// scenery URL (the password then travels unencrypted; loopback included) "
                        f"[env {ENV}ALLOW_INSECURE_SCENERY=1; default off]")
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
    s.add_argument("--curve-secret-file", "--curve-secret-key", dest="curve_secret_file", default=_env("CURVE_SECRET_FILE", None),
                   help="the server's CURVE secret key: the NAME.key_secret file of `anti-sus keygen` (or a bare Z85 secret); "
                        f"encrypts the socket [env {ENV}CURVE_SECRET_FILE; default None]")
    _add(s, "--curve-allow", "CURVE_ALLOW", None, "directory of the public .key files of the clients allowed in (needs --curve-secret-file "
         "as a keygen file); without it any client that knows the server key is served")
    s.add_argument("--instance", default=_env("INSTANCE", None),
                   help="token reported with the pid in ping/info, so a launcher knows it talks to its own child "
                        f"[env {ENV}INSTANCE; default a fresh uuid4 hex per start]")
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
        if name == "ping":
            c.add_argument("--json", action="store_true", help="print the raw JSON reply instead of one line")
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
                      max_crop=args.max_crop, clip_threshold=args.clip_threshold)
    if not 0 <= cfg.max_crop <= 0.2:
        raise UserError("--max-crop must be between 0 and 0.2")
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


def _is_z85_key(raw: bytes) -> bool:
    import zmq.utils.z85

    if len(raw) != 40:
        return False
    try:
        zmq.utils.z85.decode(raw)
    except (ValueError, KeyError, IndexError):
        return False
    return True


def curve_settings(secret_file: str | None, allow: str | None) -> dict[str, Any]:
    """Check the CURVE flags and turn them into ServerConfig fields; every mistake is one clear line.

    ``secret_file`` is a ZeroMQ certificate holding a secret (``anti-sus keygen``
    writes NAME.key_secret) or, as before, a bare Z85 secret key. ``allow`` is
    a directory of clients' public ``.key`` files.
    """
    from anti_sus.security import CurveKeyError, load_keypair

    if allow and not secret_file:
        raise UserError("--curve-allow needs --curve-secret-file (the server's .key_secret file)")
    if not secret_file:
        return {}
    path = Path(secret_file)
    hint = "make a key pair with `anti-sus keygen DIR --name gallery`"
    if not path.is_file():
        raise UserError(f"--curve-secret-file {path}: no such file ({hint})")
    try:
        _public, secret = load_keypair(path)
    except CurveKeyError:
        try:
            raw = path.read_bytes().strip()
        except OSError as exc:
            raise UserError(f"cannot read --curve-secret-file: {exc}") from None
        if not _is_z85_key(raw):
            raise UserError(f"--curve-secret-file {path} is neither a ZeroMQ certificate nor a Z85 secret key ({hint})")
        if allow:
            raise UserError("--curve-allow needs the server key as a certificate file (the .key_secret of `anti-sus keygen`), "
                            "not a bare Z85 key")
        return {"curve_secret": raw}
    if secret is None:
        raise UserError(f"--curve-secret-file {path} holds only a public key: pass the server's .key_secret file "
                        "(the public .key file is for the clients, e.g. nomad --gallery-server-key)")
    return {"curve_secret_key": path, **({"curve_allow": _allow_dir(Path(allow), load_keypair, CurveKeyError)} if allow else {})}


def _allow_dir(path: Path, load_keypair: Callable[[Path], tuple[bytes, bytes | None]], key_error: type[Exception]) -> Path:
    """The allow-list directory: public client keys only, at least one."""
    what = "--curve-allow takes a directory of the allowed clients' public .key files"
    if path.is_file():
        try:
            secret = load_keypair(path)[1]
        except key_error:
            secret = None
        if secret is not None:
            raise UserError(f"--curve-allow {path} is a secret key file: {what} (a .key_secret stays with its client)")
        raise UserError(f"--curve-allow {path} is a file: {what}; put the .key file into a directory and pass that")
    if not path.is_dir():
        raise UserError(f"--curve-allow {path} does not exist: {what}")
    keys = sorted(path.glob("*.key"))
    for key in keys:
        try:
            secret = load_keypair(key)[1]
        except key_error as exc:
            raise UserError(f"--curve-allow: {exc}") from None
        if secret is not None:
            raise UserError(f"--curve-allow: {key} holds a secret key: {what} (a .key_secret stays with its client)")
    if not keys:
        stray = sorted(p.name for p in path.glob("*.key_secret"))
        raise UserError(f"--curve-allow {path} holds no client .key file, so no client could connect"
                        + (f" (found only secret keys: {', '.join(stray)}; give the public .key files instead)" if stray else ""))
    for stray in sorted(path.glob("*.key_secret")):
        log.warning("--curve-allow %s also holds the secret key %s: only the public .key files are read; "
                    "a client's secret belongs with the client", path, stray.name)
    return path


def cmd_serve(args: argparse.Namespace) -> int:
    import zmq

    from anti_sus.observe import start_metrics
    from anti_sus.security import CurveKeyError

    from .server import Server, ServerConfig

    check_endpoint(args.bind, "--bind")
    curve = curve_settings(args.curve_secret_file, args.curve_allow)
    instance = args.instance or uuid.uuid4().hex
    if not instance or len(instance) > 128 or not instance.isprintable():
        raise UserError(f"--instance must be 1-128 printable characters, got {instance[:40]!r}")
    ingester = open_ingester(args)
    try:
        try:
            server = Server(ingester, ServerConfig(bind=args.bind, limits=_limits(args), instance=instance, **curve))
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

    from anti_sus.protocol import ProtocolError

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


def cmd_client(args: argparse.Namespace) -> int:
    import zmq

    from .client import GalleryUnavailable, IngestClient, IngestError

    check_endpoint(args.connect, "--connect")
    try:
        with IngestClient(args.connect, timeout=args.timeout, retries=args.retries) as client:
            t0 = time.perf_counter()
            reply = client.ping() if args.command == "ping" else client.info()
            elapsed_ms = 1000 * (time.perf_counter() - t0)
    except zmq.ZMQError as exc:
        raise UserError(f"--connect {args.connect!r}: {exc}") from None
    except GalleryUnavailable as exc:
        print(f"gallery-bridge: {exc}", file=sys.stderr)
        return 1
    except IngestError as exc:
        print(f"gallery-bridge: error reply {exc}", file=sys.stderr)
        return 1
    if args.command == "ping" and not args.json:
        # One line, as `anti-sus ping` prints; --json gives the reply itself.
        print(f"pong from {args.connect} in {elapsed_ms:.1f} ms (gallery_bridge {reply.get('version', '?')}, "
              f"pid {reply.get('pid', '?')}, instance {reply.get('instance', '?')})")
    else:
        print(json.dumps(reply, indent=None if args.command == "ping" else 2))
    return 0


COMMANDS = {"serve": cmd_serve, "import": cmd_import, "list": cmd_list, "rebuild": cmd_rebuild, "ping": cmd_client, "info": cmd_client}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if hasattr(args, "log_format"):
            from anti_sus.observe import setup_logging

            setup_logging(args.log_format, args.log_level)
            # Every log line, at any level and from any library, goes through the redaction.
            install_redaction()
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"gallery-bridge: {redact(str(exc))}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130
