"""Make sure the model directory has what anti_sus needs, building what is missing.

- CLIP: exported from open_clip with a pretrained tag (needs internet and the
  ``models`` extra, i.e. torch, on the first run).
- GMM: fitted on "good" images. When none is fitted, it is bootstrapped from
  the gallery folder if that already holds enough images, else from "taste"
  images fetched through nomad's own sources, rules and safe downloader: by
  default the newest Wikimedia Commons Featured pictures (no account; needs
  ``NOMAD_CONTACT`` for Wikimedia's User-Agent rule), or with
  ``--taste-source reddit`` the top images of all time of the taste subreddits
  (default r/EarthPorn; needs reddit OAuth credentials). The log says which.
- int8 CLIP (default; ``--no-int8`` or ``STACK_INT8=0`` skips it): after the GMM
  fit, ``models.quantize`` builds dynamic and static int8 variants, calibrated
  on the same good images the GMM was fitted on, and keeps the fastest whose
  cosine and GMM decisions match fp32 on held-out images; anti_sus serves it.
  When none passes, fp32 stays and this says why.
- Watermark: trained by the operator (``models.train_watermark``); without it
  the watermark stage is off, and this says so loudly.

Used by ``make up`` (``stack.up``) and by the one-shot ``models`` service of
docker-compose.yml (``python -m stack.ensure_models``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from anti_sus.modeldir import ModelDirError, read_manifest, verify
from nomad.net.errors import FetchError
from photocore.errors import UserError
from photocore.paths import DEFAULT_MODELS_DIR, models_dir
from photocore.settings import Parser, Settings, positive_int

if TYPE_CHECKING:
    from nomad.sources.base import Candidate

log = logging.getLogger("stack.models")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
TASTE_SOURCES = ("commons", "reddit")
TASTE_LISTING = "featured"
"""The Commons listing the bootstrap reads: Featured pictures, Commons' own best photos."""
REDDIT_NEEDS_OAUTH = ("--taste-source reddit reads reddit's top listings, which need OAuth: set REDDIT_CLIENT_ID and "
                      "REDDIT_CLIENT_SECRET, or use the default --taste-source commons (no account)")


class EnsureError(Exception):
    """Models are missing and cannot be built here; the message says what to do."""


def _taste_source(text: str) -> str:
    value = text.strip().lower()
    if value not in TASTE_SOURCES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(TASTE_SOURCES)}, got {text!r}")
    return value


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``stack.up`` and ``stack.ensure_models`` (env ``STACK_…``; a bad value is a UserError)."""
    g = Settings(p, "STACK_").group("models (built on first run when missing)")
    g.add("--pretrained", env="CLIP_PRETRAINED", default="openai", help="open_clip pretrained tag for ViT-B-16 (downloads once)")
    g.add("--taste-source", type=_taste_source, default="commons", metavar="{commons,reddit}",
          help="where the images that define 'good' come from when the gallery is too small: commons "
               "(the newest Wikimedia Commons Featured pictures, no account, needs NOMAD_CONTACT) or reddit "
               "(top of --taste-subreddits, needs REDDIT_CLIENT_ID/SECRET)")
    g.add("--taste-subreddits", default="EarthPorn",
          help="with --taste-source reddit: comma list of subreddits whose top images of all time define 'good'")
    g.add("--taste-limit", type=positive_int, default=300,
          help="files to read from Commons Featured pictures, or top posts per taste subreddit")
    g.add("--min-good-images", type=positive_int, default=200,
          help="fit the GMM on the gallery when it holds at least this many images")
    g.add("--components", env="GMM_COMPONENTS", default="16", help="GMM components (a comma list sweeps by BIC)")
    g.switch("--int8", default=True,
             help="build the int8 CLIP through the parity gate after the GMM fit (--no-int8 skips it)")
    p.add_argument("--taste-nomad-arg", action="append", default=[], metavar="ARG",
                   help="extra nomad flag for the taste download (repeatable, e.g. --taste-nomad-arg=--resolve=…)")


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted for reproducibility."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _have(models: Path, names: Sequence[str]) -> bool:
    try:
        arts = read_manifest(models)["artifacts"]
    except ModelDirError:
        return False
    return all(n in arts for n in names) and not verify(models, required=names)


def _gmm_matches_clip(models: Path) -> bool:
    """The fitted GMM was made on features of the CLIP model now in the directory."""
    try:
        arts = read_manifest(models)["artifacts"]
        meta = json.loads((models / arts["gmm_meta"]["file"]).read_text("utf-8"))
        return meta.get("feature_model_sha256") == arts["clip"]["sha256"]
    except (ModelDirError, KeyError, OSError, ValueError):
        return False


def _require_torch(what: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise EnsureError(f"{what} needs the model-building extra (torch): run `make setup`, "
                          "or `pip install -e '.[models]'`; for an offline try-out run `make demo`") from None


def ensure_clip(models: Path, pretrained: str) -> None:
    if _have(models, ["clip"]):
        log.info("CLIP encoder present in %s", models)
        return
    _require_torch("exporting CLIP")
    from models.export_clip import export_clip

    log.info("exporting CLIP ViT-B-16 (pretrained=%s) into %s; the weights download once", pretrained, models)
    try:
        export_clip(models, pretrained=None if pretrained in ("", "none") else pretrained)
    except Exception as exc:  # download or parity failure: say what to do, not a traceback
        raise EnsureError(f"could not export CLIP ({pretrained}): {exc}. This needs internet access to the "
                          "model hub once; without it, try the offline demo: make demo") from exc


def ensure_text(models: Path) -> None:
    """Add CLIP's text tower (text search) to a directory made before it existed; never fatal (search is optional)."""
    if _have(models, ["clip_text", "clip_vocab"]):
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        log.warning("no CLIP text tower in %s: text search is off (adding it needs torch: pip install -e '.[models]')", models)
        return
    from models.export_clip import export_text_only

    prov = read_manifest(models)["artifacts"]["clip"].get("provenance") or {}
    pretrained = prov.get("pretrained")
    log.info("adding CLIP's text tower to %s (same weights as its clip: %s / %s)", models, prov.get("arch"), pretrained)
    try:
        export_text_only(models, arch=str(prov.get("arch")), pretrained=None if pretrained in (None, "", "none") else pretrained,
                         seed=int(prov.get("seed") or 0))
    except Exception as exc:  # a download or gate failure leaves search without text, not the stack without filter
        log.warning("could not add the CLIP text tower to %s (%s): text search stays off", models, exc)


def taste_name(args: argparse.Namespace) -> str:
    """Where the taste images come from, for log lines and messages."""
    if args.taste_source == "reddit":
        return "the top images of r/" + args.taste_subreddits.replace(",", ", r/")
    return "the newest Wikimedia Commons Featured pictures"


def _taste_crawler(args: argparse.Namespace, source: str) -> Any:
    """A nomad crawler reading only ``source``, configured like ``nomad once`` plus ``--taste-nomad-arg``."""
    from nomad.cli import build_crawler, build_parser

    argv = ["once", "--state-dir", str(args.state_dir / "taste-state"), "--save-dir", str(args.state_dir / "taste-unused"),
            "--source", source, *args.taste_nomad_arg]
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit:  # argparse has printed its one line already
        raise EnsureError(f"a --taste-nomad-arg is not a nomad flag: {' '.join(args.taste_nomad_arg)}") from None
    except UserError as exc:  # a bad NOMAD_… variable
        raise EnsureError(f"cannot download taste images ({source}): {exc}") from None
    try:
        return build_crawler(ns, threading.Event())
    except (ValueError, OSError, UserError) as exc:  # SourceConfigError (e.g. no NOMAD_CONTACT), bad CA bundle, state dir, secret file
        raise EnsureError(f"cannot download taste images ({source}): {exc}") from exc


def _taste_posts(args: argparse.Namespace, crawler: Any) -> Iterator[Candidate]:
    """The posts to take taste images from, best first."""
    if args.taste_source == "reddit":
        if crawler.reddit is None:
            raise EnsureError(REDDIT_NEEDS_OAUTH)
        for sub in [s.strip() for s in args.taste_subreddits.split(",") if s.strip()]:
            posts = crawler.reddit.top(sub, "all", args.taste_limit)
            log.info("taste: r/%s top of all time: %d posts", sub, len(posts))
            yield from posts
        return
    source = next(s for s in crawler.sources if s.name == "commons")
    log.info("taste: %s, up to %d files (%s)", taste_name(args), args.taste_limit, source.describe())
    yield from source.newest(TASTE_LISTING, args.taste_limit)


def collect_taste(args: argparse.Namespace, out: Path) -> int:
    """Download taste images into ``out`` through nomad's pipeline stages; returns how many were saved.

    Post rules, link expansion (imgur, flickr, galleries), image rules, the SSRF-guarded
    downloader and the safe decoder are nomad's own; only the anti_sus stage is skipped
    (there is no GMM yet: that is what these images are for). A source that cannot be
    read at all is an :class:`EnsureError`; one that fails midway keeps what was saved.
    """
    from nomad.config import secret
    from nomad.sources.base import SourceError

    if args.taste_source == "reddit" and not (secret("REDDIT_CLIENT_ID") and secret("REDDIT_CLIENT_SECRET")):
        raise EnsureError(REDDIT_NEEDS_OAUTH)  # reddit answers anonymous JSON with a block page
    out.mkdir(parents=True, exist_ok=True)
    crawler = _taste_crawler(args, args.taste_source)
    saved = 0
    try:
        posts = _taste_posts(args, crawler)
        while True:
            try:
                post = next(posts, None)
            except (SourceError, FetchError) as exc:
                if saved:
                    log.warning("taste: %s stopped answering (%s); keeping the %d images saved", args.taste_source, exc, saved)
                    break
                raise EnsureError(f"cannot read {taste_name(args)}: {exc}") from exc
            if post is None:
                break
            if crawler.rules.check_post(post):
                continue
            try:
                refs = crawler.expand(post)
            except Exception as exc:  # noqa: BLE001 - one bad post must not stop the bootstrap
                log.info("taste: post %s skipped: %s", post.post_id, exc)
                continue
            for ref in refs:
                if crawler.rules.check_ref(ref):
                    continue
                outcome, reason, item = crawler.fetch(ref)
                if item is None:
                    log.info("taste: %s %s (%s)", ref.key, outcome, reason)
                    continue
                dest = out / f"{ref.key.replace(':', '_')}.{item.format}"
                shutil.move(str(item.spool), dest)
                saved += 1
    finally:
        crawler.close()
        crawler.store.close()
    return saved


def ensure_gmm(args: argparse.Namespace) -> None:
    models: Path = args.models
    if _have(models, ["gmm", "gmm_meta"]) and _gmm_matches_clip(models):
        log.info("GMM present in %s and fitted on this CLIP encoder", models)
        return
    good = find_images(Path(args.gallery) / "images")
    if len(good) >= args.min_good_images:
        source = Path(args.gallery) / "images"
        log.info("GMM: fitting on the %d images already in the gallery %s", len(good), source)
    else:
        source = Path(args.state_dir) / "taste"
        have = len(find_images(source))
        log.info("GMM: the gallery has %d images (< %d); using %s instead", len(good), args.min_good_images, taste_name(args))
        if have < args.min_good_images:
            got = collect_taste(args, source)
            log.info("GMM: downloaded %d taste images into %s", got, source)
        have = len(find_images(source))
        if have == 0:
            raise EnsureError(f"no good images to fit the GMM on: the gallery is too small and nothing could be "
                              f"downloaded from {taste_name(args)}. Put photos you like into "
                              f"{Path(args.gallery) / 'images'} or run: python -m models.fit_gmm --models {models} --images DIR")
        log.info("GMM: fitting on %d taste images in %s", have, source)
    from models import fit_gmm

    comps = args.components
    argv = ["--models", str(models), "--images", str(source), "--components", comps]
    if "," in comps:
        argv += ["--select", "bic"]
    try:
        code = fit_gmm.main(argv)
    except Exception as exc:  # models' UserError and friends: one clear line
        raise EnsureError(f"fitting the GMM on {source} failed: {exc}") from exc
    if code != 0:
        raise EnsureError(f"fitting the GMM failed (exit {code}); see the messages above")


def _int8_wanted(args: argparse.Namespace) -> bool:
    if getattr(args, "int8", None) is not None:
        return bool(args.int8)
    from photocore.settings import parse_bool

    raw = os.environ.get("STACK_INT8") or "1"
    try:
        return parse_bool(raw)
    except ValueError:
        raise EnsureError(f"STACK_INT8={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)") from None


def good_images_dir(args: argparse.Namespace) -> Path | None:
    """The folder the GMM is fitted on (the gallery when it is big enough, else the taste images), if it has images."""
    gallery = Path(args.gallery) / "images"
    if len(find_images(gallery)) >= args.min_good_images:
        return gallery
    taste = Path(args.state_dir) / "taste"
    return taste if find_images(taste) else None


def ensure_int8(args: argparse.Namespace) -> None:
    """Build ``clip_int8`` through the int8 gate unless its report is current; a failed gate leaves fp32 in service."""
    from anti_sus.modeldir import int8_unusable

    models: Path = args.models
    if not _int8_wanted(args):
        log.info("int8 CLIP not built (--no-int8 / STACK_INT8=0): anti_sus serves fp32")
        return
    why = int8_unusable(read_manifest(models)["artifacts"])
    if not why:
        log.info("int8 CLIP present; its gate passed for this CLIP and GMM")
        return
    folder = good_images_dir(args)
    if folder is None:
        log.warning("int8 CLIP not built: no good images to calibrate and check it on; anti_sus serves fp32")
        return
    from models import quantize

    log.info("int8 CLIP: %s; running the int8 gate on the images under %s", why, folder)
    try:
        report, entry = quantize.run_target(models, "clip", folder, threads=min(4, os.cpu_count() or 1))
    except Exception as exc:  # models' UserError, ORT errors: one clear line
        raise EnsureError(f"the int8 gate on {folder} failed: {exc} (skip it with --no-int8)") from exc
    for line in report.summary().splitlines():
        log.info("int8 gate: %s", line)
    if entry is None:
        log.warning("no int8 CLIP variant kept parity with fp32 on %s: anti_sus serves fp32", folder)


def ensure(args: argparse.Namespace) -> None:
    """Build whatever anti_sus needs and is missing; warn loudly about the optional watermark model."""
    models: Path = args.models
    models.mkdir(parents=True, exist_ok=True)
    ensure_clip(models, args.pretrained)
    ensure_text(models)
    ensure_gmm(args)
    ensure_int8(args)
    if not _have(models, ["watermark"]):
        bar = "!" * 78
        log.warning("\n%s\nNO WATERMARK MODEL in %s: the watermark stage is OFF and watermarked photos will pass.\n"
                    "Train one: python -m models.train_watermark --data DIR --out wm.safetensors, then\n"
                    "python -m models.export_watermark --weights wm.safetensors --out %s (see docs/models.md)\n%s",
                    bar, models, models, bar)
    problems = verify(models)
    if problems:
        raise EnsureError("model directory still not usable:\n  " + "\n  ".join(problems))


def parser() -> argparse.ArgumentParser:
    """``python -m stack.ensure_models``'s flags (env ``STACK_…``)."""
    p = Parser(prog="python -m stack.ensure_models", description=__doc__.split("\n\n")[0])
    s = Settings(p, "STACK_")
    s.add("--models", type=Path, default=Path(DEFAULT_MODELS_DIR), help="model directory")
    s.add("--gallery", type=Path, default=Path("gallery"), help="gallery folder")
    s.add("--state-dir", type=Path, default=Path("state"), help="where taste images are kept")
    s.add("--log-format", choices=["text", "json"], default="text", help="log line format")
    add_model_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except UserError as exc:  # a bad STACK_… variable: one line, before anything is built
        print(f"python -m stack.ensure_models: error: {exc}", file=sys.stderr)
        return 2
    from photocore.observe import setup_logging

    setup_logging(args.log_format)
    args.models = models_dir(args.models)  # an old models/ folder is still read, with a notice
    try:
        ensure(args)
    except (EnsureError, UserError) as exc:  # UserError: e.g. an unreadable REDDIT_CLIENT_ID_FILE
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
