"""Map what nomad recorded in its state DB to the emulator's outcome labels (scenario.expected)."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterable

from nomad.store import Store

OTHER_SOURCES = ("flickr_", "at://")
"""Label prefixes that are post ids of sources other than reddit (commons' ``M<pageid>`` is matched apart)."""

POST_LABELS = {
    "nsfw": "skip_nsfw", "spoiler": "skip_spoiler", "video": "skip_video", "removed": "skip_removed",
    "no_image": "skip_not_image", "no_media": "skip_no_media", "not_found": "fail_not_found",
}
IMAGE_LABELS = {
    "too_small": "skip_small", "too_wide": "skip_aspect", "too_tall": "skip_aspect", "animated": "skip_animated",
    "unavailable": "skip_failed", "video": "skip_video", "outlier": "accept_candidate", "watermark": "accept_candidate",
}


def outcome(store: Store, label_key: str) -> str:
    """The label for ``post_id`` or ``post_id/n`` as the emulator's scenario spells it."""
    # An at:// post id holds slashes itself; its label never has an image index.
    pid, _, n = (label_key, "", "") if label_key.startswith("at://") else label_key.partition("/")
    # reddit labels are bare ids (aa0001 -> t3_aa0001); other sources' labels are their post ids (flickr_<id>).
    other = pid.startswith(OTHER_SOURCES) or (pid[:1] == "M" and pid[1:].isdigit())
    post_id = pid if other else f"t3_{pid}"
    state = store.post_state(post_id)
    if state is None:
        return "unseen"
    if state[0] != "expanded":
        return POST_LABELS.get(state[1] or "", f"post_{state[0]}_{state[1]}")
    images = store.images_of(post_id)
    if n:
        if int(n) >= len(images):
            return "missing_image"
        _key, st, reason = images[int(n)]
    elif len(images) == 1:
        _key, st, reason = images[0]
    else:
        return f"{len(images)}_images"
    if st in ("accepted", "delivered"):
        return "accept_candidate"
    if st == "rejected" and reason in IMAGE_LABELS:
        return IMAGE_LABELS[reason]
    if st in ("rejected", "failed"):
        return f"fail_{reason}"
    return f"{st}_{reason}"


# What the default scenario's reddit posts become through the Atom feed without any credentials
# (reddit, imgur and flickr keys all unset), where that differs from the JSON labels.
KEYLESS_REDDIT = {
    "aa0007": "skip_no_media",  # a gallery: the feed lists no items
    "aa0010": "skip_not_image",  # a crosspost: its [link] is the parent's permalink
    "bb0003": "post_rejected_imgur_no_client_id",  # albums need the imgur API
    "bb0004": "post_rejected_imgur_no_client_id",
    "cc0001": "post_rejected_flickr_no_api_key",  # flickr pages need the REST API
    "cc0002": "post_rejected_flickr_no_api_key",
    "cc0004": "post_rejected_flickr_no_api_key",
    "dd0001": "accept_candidate",  # NSFW: the feed has no over_18 flag (left to anti_sus, documented)
    "dd0002": "accept_candidate",  # spoiler: no flag either
    "dd0004": "unseen",  # removed posts leave the feed
}


def keyless_expected(scenario: object) -> dict[str, str]:
    """Labels for ``nomad once --source reddit --source flickr`` with no credentials set."""
    expected: dict[str, str] = {
        k: v for k, v in scenario.expected.items() if k.split("/")[0] not in KEYLESS_REDDIT  # type: ignore[attr-defined]
    }
    expected.update(KEYLESS_REDDIT)
    expected.update(scenario.flickr_feed_expected)  # type: ignore[attr-defined]
    return expected


BLUESKY_SEEN = ("accept_candidate", "skip_small")
"""Bluesky labels of posts the source hands on; the others (adult labels, opt-outs, text) it drops unseen."""


def all_keyless_expected(scenario: object) -> dict[str, str]:
    """Labels for ``nomad once`` with every key-less source (reddit, commons, flickr, bluesky) and no credentials."""
    expected = keyless_expected(scenario)
    expected.update(scenario.commons.expected)  # type: ignore[attr-defined]
    expected.update({pid: (label if label in BLUESKY_SEEN else "unseen")
                     for pid, label in scenario.jetstream.expected.items()})  # type: ignore[attr-defined]
    return expected


def keyless_cycle(emu: Any, tmp: Path, expected: Iterable[str], *args: str, deadline: str = "2") -> tuple[Any, dict[str, str], dict[str, Any], list[str]]:
    """One in-process ``nomad once`` cycle over the emulator with no credentials and a scripted anti_sus.

    Returns (cycle stats, the label of every key in ``expected``, the sources' statuses, the source names).
    """
    from nomad.cli import build_crawler, build_parser
    from tests.test_nomad_crawler import FakeFilter

    parsed = build_parser({}).parse_args(
        ["once", *emu.nomad_args(), *args, "--state-dir", str(tmp / "state"), "--save-dir", str(tmp / "out"),
         "--deadline", deadline, "--http-retries", "0", "--backoff-max", "0.2"])
    crawler = build_crawler(parsed, threading.Event(), environ=emu.nomad_env(keyless=True))
    crawler.filter_stage.client = FakeFilter()
    try:
        names = [s.name for s in crawler.sources]
        stats = crawler.cycle(final=True)
        got = {k: outcome(crawler.store, k) for k in expected}
        statuses = crawler.store.source_statuses()
    finally:
        crawler.shutdown()
        crawler.store.close()
    return stats, got, statuses, names
