"""The static contact sheet ``GALLERY/index.html``: newest first, regenerated on ingest.

Every value from metadata is HTML-escaped, and only http(s) URLs (already
checked at ingest) become links; image links are relative paths built from
catalogue ids, never from metadata. The page holds the newest ``limit``
entries and says so when there are more (``gallery-bridge list`` shows all).
"""
from __future__ import annotations

import html
import json
import sqlite3
from typing import Iterable, Sequence

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1rem;background:#111;color:#ddd}
h1{font-size:1.2rem;font-weight:600}
.sheet{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;position:relative}
figure img{height:180px;width:auto;display:block;background:#222}
figcaption{font-size:.75rem;max-width:320px;overflow:hidden;white-space:nowrap;text-overflow:ellipsis}
a{color:#9cf}
.note{color:#aaa;font-size:.85rem}
"""


def _tooltip(row: sqlite3.Row) -> str:
    """Hover text: title, where it came from and the anti_sus scores."""
    parts = []
    if row["title"]:
        parts.append(row["title"])
    where = " ".join(x for x in (f"r/{row['subreddit']}" if row["subreddit"] else "", f"by {row['author']}" if row["author"] else "") if x)
    if where:
        parts.append(where)
    try:
        scores = json.loads(row["scores"] or "{}")
    except ValueError:
        scores = {}
    if scores:
        parts.append(", ".join(f"{k} {v:.3g}" for k, v in sorted(scores.items()) if isinstance(v, (int, float))))
    if row["licence"]:
        parts.append(f"licence: {row['licence']}")
    parts.append(f"{row['width']}x{row['height']}, added {row['added_at']}")
    return "\n".join(parts)


def figure(row: sqlite3.Row) -> str:
    """One entry's ``<figure>``: the page is these, newest first, between :func:`assemble`'s head and tail.

    Depends on the row alone, so the folder target keeps the shown ones and
    renders only a new entry's on ingest (gallery_bridge.targets.folder).
    """
    esc = html.escape
    gid = int(row["id"])
    original = f"images/{gid}.{esc(row['ext'])}"
    thumb = f"thumbs/{gid}.jpg"
    source = row["permalink"] or row["source_url"]
    caption = esc(row["title"] or f"#{gid}")
    link = (f' · <a href="{esc(source)}" rel="noopener noreferrer nofollow">source</a>' if source else "")
    return (
        f'<figure id="e{gid}"><a href="{original}"><img src="{thumb}" loading="lazy" '
        f'alt="{caption}" title="{esc(_tooltip(row))}"></a>'
        f"<figcaption>{caption}{link}</figcaption></figure>"
    )


def frame(shown: int, total: int, title: str = "gallery") -> tuple[str, str]:
    """The page around its figures: (head, tail); the page is ``"\\n".join([head, *figures, tail])``."""
    esc = html.escape
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # The page only shows local files and links out: no scripts, no remote loads.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'\">",
        f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(title)}: {total} image{'s' if total != 1 else ''}</h1>",
    ]
    if total > shown:
        out.append(f'<p class="note">Showing the newest {shown} of {total}; run <code>gallery-bridge list</code> for the rest.</p>')
    out.append('<div class="sheet">')
    return "\n".join(out), "</div></body></html>\n"


def assemble(figures: Iterable[str], shown: int, total: int, title: str = "gallery") -> str:
    """The whole page from ``shown`` already rendered figures (newest first) out of ``total`` entries."""
    head, tail = frame(shown, total, title)
    return "\n".join([head, *figures, tail])


def render(rows: Sequence[sqlite3.Row], total: int, title: str = "gallery") -> str:
    """The whole page for ``rows`` (newest first) out of ``total`` entries."""
    return assemble([figure(row) for row in rows], len(rows), total, title)
