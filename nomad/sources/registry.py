"""The source registry: listing sources by ``--source`` name, link expanders by URL.

Two kinds, kept apart (as gallery-dl does):

* **listing sources** produce posts: one module per site, ``nomad.sources.<name>``
  for each name in :data:`LISTING_MODULES`, exposing ``NAME``,
  ``add_flags(flags)``, ``build(args, ctx)`` and ``available(args, environ)``
  (optionally ``credentials(environ)`` and ``size_rules(args)``). A module that
  is not there, or lacks one of those four, is skipped with a debug log line,
  so a nomad without (say) ``bluesky.py`` still runs its other sources.
* **link expanders** turn a post's link into image files: imgur albums and
  pages, flickr pages, ``flic.kr`` short links. :class:`ExpanderRegistry`
  maps a URL's host to the expander that owns it; anything else is a direct
  file or unsupported (``nomad.sources.base.site_of``).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

from .api import SourceContext
from .base import ImageRef, Link, ListingSource, SourceConfigError, host_matches, host_of

log = logging.getLogger(__name__)

LISTING_MODULES = ("reddit", "commons", "flickr", "bluesky")
"""Every listing source nomad knows, in polling order; each is ``nomad.sources.<name>``."""

CONTRACT = ("NAME", "add_flags", "build", "available")


@dataclass
class CrawlContext(SourceContext):
    """:class:`SourceContext` plus the crawler's wait counter (``on_wait(source, why, seconds)``)."""

    on_wait: Callable[[str, str, float], None] | None = None


def listing_modules(names: Sequence[str] = LISTING_MODULES) -> dict[str, ModuleType]:
    """The listing-source modules present and complete, by name (imported on first use)."""
    found: dict[str, ModuleType] = {}
    for name in names:
        modname = f"{__package__}.{name}"
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                log.debug("source %s: no module %s, skipped", name, modname)
            else:
                log.warning("source %s: %s needs %s, which is not installed; skipped", name, modname, exc.name)
            continue
        except Exception as exc:  # noqa: BLE001 - one broken source module must not take the others down
            log.warning("source %s: %s failed to import (%s: %s); skipped", name, modname, type(exc).__name__, exc)
            continue
        missing = [attr for attr in CONTRACT if not hasattr(mod, attr)]
        if missing:
            log.debug("source %s: %s lacks %s, skipped", name, modname, ", ".join(missing))
            continue
        if getattr(mod, "NAME") != name:
            log.debug("source %s: %s says NAME=%r, skipped", name, modname, getattr(mod, "NAME"))
            continue
        found[name] = mod
    return found


def add_flags(flags: Any, modules: Mapping[str, ModuleType] | None = None) -> None:
    """``--source`` and every present source's own flags (``flags`` is ``nomad.config._Flags``)."""
    mods = listing_modules() if modules is None else modules
    flags.add("--source", many=True, default=[],
              help=f"listing source to poll, repeatable ({', '.join(mods) or 'none installed'}); "
                   "empty: every source that works with what is configured")
    for mod in mods.values():
        mod.add_flags(flags)


def requested(args: Any) -> list[str]:
    """The ``--source`` names given (flags, else ``NOMAD_SOURCE``), commas split, order kept, no repeats."""
    from nomad.config import many

    out: list[str] = []
    for value in many(args, "source"):
        for name in str(value).split(","):
            name = name.strip().lower()
            if name and name not in out:
                out.append(name)
    return out


def selected(args: Any, environ: Mapping[str, str], modules: Mapping[str, ModuleType] | None = None) -> list[str]:
    """The listing sources to run: those asked for, else every one whose ``available()`` is true."""
    mods = listing_modules() if modules is None else modules
    asked = requested(args)
    for name in asked:
        if name not in LISTING_MODULES:
            raise SourceConfigError(f"unknown source {name!r} (known: {', '.join(LISTING_MODULES)})")
        if name not in mods:
            raise SourceConfigError(f"source {name!r} is not part of this nomad (present: {', '.join(mods) or 'none'})")
    if asked:
        return asked
    return [name for name, mod in mods.items() if mod.available(args, environ)]


def build_sources(args: Any, ctx: SourceContext, modules: Mapping[str, ModuleType] | None = None) -> list[ListingSource]:
    """Build the selected sources; one that cannot run with what is configured is an error.

    A source picked by default said ``available()``, so a failing ``build`` is a
    half-done configuration (REDDIT_CLIENT_ID without its secret): say so, do not
    silently mine less.
    """
    mods = listing_modules() if modules is None else modules
    sources: list[ListingSource] = []
    for name in selected(args, ctx.environ, mods):
        try:
            sources.append(mods[name].build(args, ctx))
        except ValueError as exc:  # SourceConfigError, or ValueError from modules written before it existed
            raise SourceConfigError(f"source {name}: {exc}") from exc
    if not sources:
        raise SourceConfigError("no listing source can run with what is configured (see `nomad sources`)")
    return sources


def size_rules(args: Any, names: Sequence[str], modules: Mapping[str, ModuleType] | None = None) -> dict[str, tuple[int, int]]:
    """Per-source (min long side, min short side) for the sources that set their own."""
    mods = listing_modules() if modules is None else modules
    out: dict[str, tuple[int, int]] = {}
    for name in names:
        fn = getattr(mods.get(name), "size_rules", None)
        if callable(fn):
            long_side, short_side = fn(args)
            out[name] = (int(long_side), int(short_side))
    return out


def _needs(mod: ModuleType) -> str:
    """The ``needs`` line of the module's ListingSource class (for modules without ``credentials``)."""
    for value in vars(mod).values():
        if isinstance(value, type) and issubclass(value, ListingSource) and value is not ListingSource:
            if getattr(value, "name", "") == mod.NAME:
                return str(value.needs)
    return "?"


@dataclass
class SourceRow:
    """One line of ``nomad sources``."""

    name: str
    on: bool
    why: str
    credentials: str
    status: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "on": self.on, "why": self.why, "credentials": self.credentials, "status": self.status}


def rows(args: Any, environ: Mapping[str, str], statuses: Mapping[str, Mapping[str, Any]],
         modules: Mapping[str, ModuleType] | None = None) -> list[SourceRow]:
    """Each known source: on or off and why, its credentials, its last stored status."""
    mods = listing_modules() if modules is None else modules
    asked = requested(args)
    out = []
    for name in LISTING_MODULES:
        mod = mods.get(name)
        status = dict(statuses.get(name) or {})
        if mod is None:
            out.append(SourceRow(name, False, "not part of this nomad", "-", status))
            continue
        creds_fn = getattr(mod, "credentials", None)
        creds = str(creds_fn(environ)) if callable(creds_fn) else _needs(mod)
        try:
            can_run = bool(mod.available(args, environ))
        except Exception as exc:  # noqa: BLE001 - a report must show every source, even a broken one
            can_run, creds = False, f"{creds} (available() failed: {exc})"
        if asked:
            on, why = name in asked, "--source" if name in asked else "not in --source"
        else:
            on, why = can_run, "default" if can_run else "not configured"
        out.append(SourceRow(name, on, why, creds, status))
    return out


# --- link expanders ------------------------------------------------------------------------

@dataclass
class Expander:
    """A site that turns links on its hosts into images; ``client.expand(link, key_prefix, start)``."""

    name: str
    domains: tuple[str, ...]
    client: Any

    def matches(self, url: str) -> bool:
        host = host_of(url)
        return bool(host) and any(host_matches(host, d) for d in self.domains)

    def expand(self, link: Link, key_prefix: str, start: int) -> list[ImageRef]:
        return list(self.client.expand(link, key_prefix, start))


class ExpanderRegistry:
    """URL -> the expander owning its host (first match wins)."""

    def __init__(self, expanders: Sequence[Expander]) -> None:
        self.expanders = list(expanders)

    def for_url(self, url: str) -> Expander | None:
        return next((e for e in self.expanders if e.matches(url)), None)

    def get(self, name: str) -> Expander:
        return next(e for e in self.expanders if e.name == name)

    def names(self) -> list[str]:
        return [e.name for e in self.expanders]


def build_expanders(http: Any, args: Any, environ: Mapping[str, str]) -> ExpanderRegistry:
    """imgur (albums, pages; IMGUR_CLIENT_ID) and flickr (pages, flic.kr, static files; FLICKR_API_KEY)."""
    from nomad.config import secret

    from .flickr import FlickrClient
    from .imgur import ImgurClient

    imgur = ImgurClient(http, api_url=args.imgur_api_url, client_id=secret("IMGUR_CLIENT_ID", environ))
    flickr = FlickrClient(http, api_url=args.flickr_api_url, api_key=secret("FLICKR_API_KEY", environ))
    return ExpanderRegistry([
        Expander("imgur", ("imgur.com",), imgur),
        Expander("flickr", ("flickr.com", "flic.kr", "staticflickr.com"), flickr),
    ])
