"""Map what nomad recorded in its state DB to the emulator's outcome labels (scenario.expected)."""
from __future__ import annotations

from nomad.store import Store

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
    pid, _, n = label_key.partition("/")
    state = store.post_state(f"t3_{pid}")
    if state is None:
        return "unseen"
    if state[0] != "expanded":
        return POST_LABELS.get(state[1] or "", f"post_{state[0]}_{state[1]}")
    images = store.images_of(f"t3_{pid}")
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
