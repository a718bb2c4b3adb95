"""The Flask application: pages, the JSON API they use, and the media routes.

Reads go straight to the catalogue (read-only, see :mod:`.queries`); the one
write, a label, goes to the running ``gallery-bridge serve`` over its
``label`` op (:mod:`.services`), so the catalogue keeps one writer. Item ids
are ``g<entry id>`` (a gallery image) and ``r<review id>`` (a rejected image
waiting for review).
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
from flask import Flask, Response, abort, g, jsonify, redirect, render_template, request, send_file, session, url_for
from werkzeug.exceptions import HTTPException

from photocore.protocol import ProtocolError

from .. import __version__
from ..labels import parse_item as labels_item
from . import queries, security, services
from .services import Unavailable

LABELS = ("good", "bad")
PAGE_SIZE = 48
MEDIA_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


@dataclass
class WebConfig:
    """Everything the app needs; the CLI fills it from flags and ``GALLERY_BRIDGE_WEB_…`` variables."""

    gallery: Path
    connect: str = "tcp://127.0.0.1:7778"
    models: Path | None = None
    token: str | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_pixels: int = 40_000_000
    timeout: float = 10.0

    @property
    def catalogue(self) -> Path:
        return self.gallery / "catalogue.sqlite"


def parse_item(text: str) -> tuple[str, int]:
    """``g12`` -> ("g", 12); a bare number is a gallery entry; anything else is a 404."""
    if text.isdigit() and len(text) <= 18:
        return "g", int(text)
    try:
        return labels_item(text)  # the label op's own rule for item ids
    except ProtocolError:
        abort(404, f"no item {text[:40]!r}: ids are g<entry id> or r<review id>")


def _int_arg(name: str, default: int | None, lo: int = 1, hi: int = 2**62) -> int | None:
    raw = request.args.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        abort(400, f"{name} must be a whole number, got {raw[:40]!r}")
    return max(lo, min(hi, int(raw)))


def safe_url(value: Any) -> str | None:
    """Only http(s) URLs become links (they were checked at ingest; this is the second line)."""
    if not isinstance(value, str):
        return None
    return value if urlsplit(value).scheme in ("http", "https") else None


def create_app(cfg: WebConfig) -> Flask:
    """The app for one gallery folder."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_upload_bytes + 64 * 1024  # the file plus the form around it
    app.json.sort_keys = False  # type: ignore[attr-defined]
    security.install(app, cfg.token)
    search = services.Search(cfg.catalogue, cfg.models)
    zctx = zmq.Context()
    app.extensions["gallery_web"] = {"config": cfg, "search": search, "zmq": zctx}
    app.jinja_env.filters["safe_url"] = safe_url
    app.jinja_env.globals["version"] = __version__

    def db() -> sqlite3.Connection | None:
        if "db" not in g:
            g.db = queries.connect(cfg.catalogue)
        return g.db

    @app.teardown_appcontext
    def close_db(_exc: BaseException | None) -> None:
        conn = g.pop("db", None)
        if conn is not None:
            conn.close()

    def api_error(status: int, code: str, message: str) -> Response:
        resp = jsonify(error=code, message=message)
        resp.status_code = status
        return resp

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        if request.path.startswith("/api/") or request.path == "/healthz":
            return api_error(exc.code or 500, (exc.name or "error").lower().replace(" ", "_"), exc.description or "")
        return render_template("error.html", status=exc.code, title=exc.name, message=exc.description), exc.code

    @app.errorhandler(Unavailable)
    def unavailable(exc: Unavailable) -> Any:
        if request.path.startswith("/api/"):
            return api_error(503, "unavailable", str(exc))
        return render_template("error.html", status=503, title="Not available", message=str(exc)), 503

    @app.errorhandler(queries.FilterError)
    def bad_filter(exc: queries.FilterError) -> Any:
        if request.path.startswith("/api/"):
            return api_error(400, "bad_filter", str(exc))
        return render_template("error.html", status=400, title="Bad filter", message=str(exc)), 400

    @app.errorhandler(services.BadQuery)
    def bad_query(exc: services.BadQuery) -> Any:
        if request.path.startswith("/api/"):
            return api_error(400, "bad_query", str(exc))
        return render_template("error.html", status=400, title="Bad query", message=str(exc)), 400

    # ---- helpers shared by pages and API ---------------------------------------------------------------------
    def with_urls(entry: dict[str, Any]) -> dict[str, Any]:
        eid = entry["id"]
        entry["thumb_url"] = url_for("media_thumb", entry_id=eid)
        entry["image_url"] = url_for("media_image", entry_id=eid)
        entry["page_url"] = url_for("detail", item=f"g{eid}")
        return entry

    def review_with_urls(item: dict[str, Any]) -> dict[str, Any]:
        item["item"] = f"r{item['id']}"
        item["image_url"] = url_for("media_review", review_id=item["id"])
        item.setdefault("label", services.label_of(db(), item["item"]))
        return item

    def browse_data() -> tuple[list[dict[str, Any]], int | None, queries.Filters]:
        filters = queries.Filters.parse(request.args)
        limit = _int_arg("limit", PAGE_SIZE, 1, queries.MAX_LIMIT) or PAGE_SIZE
        items, nxt = queries.page(db(), limit, _int_arg("before", None), filters)
        return [with_urls(i) for i in items], nxt, filters

    def hits(results: list[tuple[int, float]]) -> list[dict[str, Any]]:
        """Search results as entries (in score order), each with its cosine; vanished entries dropped."""
        found = queries.entries(db(), [i for i, _ in results])
        return [with_urls(found[i]) | {"score": s} for i, s in results if i in found]

    def search_limit() -> int:
        return _int_arg("limit", PAGE_SIZE, 1, queries.MAX_LIMIT) or PAGE_SIZE

    def checked_upload() -> bytes:
        """The uploaded file, under the size cap and decoded with ingest's own guards (magic bytes, pixel cap)."""
        from ..validate import Limits, check_image

        f = request.files.get("image")
        if f is None:
            abort(400, "no file: send it as the form field 'image'")
        data = f.read(cfg.max_upload_bytes + 1)
        if not data:
            abort(400, "the uploaded file is empty")
        try:
            check_image(data, Limits(max_image_bytes=cfg.max_upload_bytes, max_pixels=cfg.max_upload_pixels, min_side=1))
        except ProtocolError as exc:
            abort(413 if exc.code == "too_large" else 400, exc.message)
        return data

    # ---- pages -----------------------------------------------------------------------------------------------
    @app.get("/")
    def browse() -> str:
        items, nxt, filters = browse_data()
        conn = db()
        return render_template("browse.html", items=items, next_before=nxt, filters=filters, total=queries.count(conn),
                               has_catalogue=conn is not None, sources=queries.sources(conn),
                               score_names=queries.score_names(conn),
                               next_args=filters.query() | ({"before": nxt} if nxt else {}))

    def lookup(item: str) -> tuple[str, int, dict[str, Any]]:
        """``(kind, number, fields with URLs)`` of a review item or a gallery entry (with its label), or a 404."""
        kind, num = parse_item(item)
        if kind == "r":
            it = services.review_item(db(), num)
            if it is None:
                abort(404, f"no review item r{num}")
            return kind, num, review_with_urls(it)
        entry = queries.entry(db(), num)
        if entry is None:
            abort(404, f"no gallery image g{num}")
        entry["label"] = services.label_of(db(), f"g{num}")
        return kind, num, with_urls(entry)

    @app.get("/items/<item>")
    def detail(item: str) -> str:
        kind, num, fields = lookup(item)
        if kind == "r":
            return render_template("review_detail.html", it=fields)
        similar: list[dict[str, Any]] = []
        similar_note = None
        try:
            similar = [s for s in hits(search.by_entry(num, 13)) if s["id"] != num][:12]
        except Unavailable as exc:
            similar_note = str(exc)
        return render_template("detail.html", e=fields, similar=similar, similar_note=similar_note)

    @app.get("/search")
    def search_page() -> str:
        q = request.args.get("q", "").strip()[:300]
        like = request.args.get("like", "").strip()
        results: list[dict[str, Any]] = []
        note = None
        try:
            if like:
                _, num = parse_item(like)
                results = hits(search.by_entry(num, search_limit()))
            elif q:
                results = hits(search.by_text(q, search_limit()))
        except Unavailable as exc:
            note = str(exc)
        return render_template("search.html", q=q, like=like, results=results, note=note)

    @app.post("/search/upload")
    def search_upload() -> str:
        data = checked_upload()
        note = None
        results: list[dict[str, Any]] = []
        try:
            results = hits(search.by_image(data, search_limit()))
        except Unavailable as exc:
            note = str(exc)
        return render_template("search.html", q="", like="", results=results, note=note, uploaded=True)

    @app.get("/review")
    def review() -> str:
        note = None
        items: list[dict[str, Any]] = []
        total = 0
        try:
            items, total = services.review_page(db(), _int_arg("limit", PAGE_SIZE, 1, queries.MAX_LIMIT) or PAGE_SIZE,
                                                _int_arg("before", None))
        except Unavailable as exc:
            note = str(exc)
        items = [review_with_urls(i) for i in items]
        nxt = items[-1]["id"] if len(items) >= PAGE_SIZE else None
        return render_template("review.html", items=items, total=total, note=note, next_before=nxt)

    @app.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        target = request.args.get("next", "/")
        if not target.startswith("/") or target.startswith("//") or "\\" in target:
            target = "/"  # only paths of this site: no open redirect
        error = None
        if request.method == "POST":
            if app.extensions["gallery_web_check_login"](request.form.get("token", "")):
                session.clear()
                session["auth"] = True
                return redirect(target)
            error = "wrong token"
        return render_template("login.html", error=error, target=target), (401 if error else 200)

    # ---- media -----------------------------------------------------------------------------------------------
    def _send(path: Path, mimetype: str) -> Response:
        if not path.is_file():
            abort(404, "file not found")
        resp = send_file(path, mimetype=mimetype, conditional=True, max_age=3600)
        return resp

    @app.get("/media/images/<int:entry_id>")
    def media_image(entry_id: int) -> Response:
        ext = queries.file_of(db(), entry_id)
        if ext not in MEDIA_TYPES:
            abort(404, "no such image")
        # Files are named by catalogue id and a known extension: nothing from a request reaches the path.
        return _send(cfg.gallery / "images" / f"{entry_id}.{ext}", MEDIA_TYPES[ext])

    @app.get("/media/thumbs/<int:entry_id>")
    def media_thumb(entry_id: int) -> Response:
        if queries.file_of(db(), entry_id) is None:
            abort(404, "no such image")
        return _send(cfg.gallery / "thumbs" / f"{entry_id}.jpg", "image/jpeg")

    @app.get("/media/review/<int:review_id>")
    def media_review(review_id: int) -> Response:
        it = services.review_item(db(), review_id)
        if it is None:
            abort(404, "no such review item")
        path = services.review_image(cfg.gallery, it)
        return _send(path, MEDIA_TYPES.get(path.suffix.lstrip(".").lower(), "image/jpeg"))

    # ---- JSON API --------------------------------------------------------------------------------------------
    @app.get("/healthz")
    def healthz() -> Response:
        conn = db()
        return jsonify(status="ok", version=__version__, catalogue=conn is not None, entries=queries.count(conn))

    @app.get("/api/images")
    def api_images() -> Response:
        items, nxt, _ = browse_data()
        return jsonify(items=items, next_before=nxt, total=queries.count(db()))

    @app.get("/api/images/<item>")
    def api_image(item: str) -> Response:
        return jsonify(lookup(item)[2])

    @app.get("/api/search")
    def api_search() -> Response:
        q = request.args.get("q", "").strip()[:300]
        like = request.args.get("like", "").strip()
        if like:
            _, num = parse_item(like)
            return jsonify(query={"like": f"g{num}"}, items=hits(search.by_entry(num, search_limit())))
        if not q:
            abort(400, "give q=TEXT (or like=g<id>)")
        return jsonify(query={"q": q}, items=hits(search.by_text(q, search_limit())))

    @app.post("/api/search/image")
    def api_search_image() -> Response:
        data = checked_upload()
        return jsonify(query={"image": len(data)}, items=hits(search.by_image(data, search_limit())))

    @app.get("/api/review")
    def api_review() -> Response:
        items, total = services.review_page(db(), _int_arg("limit", PAGE_SIZE, 1, queries.MAX_LIMIT) or PAGE_SIZE,
                                            _int_arg("before", None))
        items = [review_with_urls(i) for i in items]
        limit = _int_arg("limit", PAGE_SIZE, 1, queries.MAX_LIMIT) or PAGE_SIZE
        return jsonify(items=items, total=total, next_before=items[-1]["id"] if len(items) >= limit else None)

    @app.post("/api/items/<item>/label")
    def api_label(item: str) -> Response:
        kind, num = parse_item(item)
        body = request.get_json(silent=True)
        label = body.get("label") if isinstance(body, dict) else None
        if label not in LABELS:
            abort(400, 'send {"label": "good"} or {"label": "bad"}')
        from ..client import IngestError

        try:
            reply = services.send_label(cfg.connect, f"{kind}{num}", label, cfg.timeout, zctx)
        except IngestError as exc:
            # serve names a missing item "no gallery entry g12" / "no review item r7" (code bad_header).
            status = 404 if exc.code == "not_found" or exc.message.startswith("no ") else 400
            return api_error(status, exc.code, exc.message)
        return jsonify(item=f"{kind}{num}", label=label, **{k: v for k, v in reply.items() if k not in ("item", "label")})

    return app
