"""Fingerprints: everything dedup needs about one image, computed once at ingest.

* ``phash``: scenery's 576-bit DCT hash (imagehash ``phash`` with hash_size 24
  from a 96x96 grey image), of the image and of its mirror. Compatible with
  what scenery stores.
* ``coarse``: a 64-bit DCT hash (8x8 from 32x32, only the lowest
  frequencies, which a few-percent crop barely moves), of the image and of its
  mirror: the crop check's candidate picker.
* ``signature``: the 96x96 grey image itself, which the crop check aligns.

The coarse hash is also the 64-bit pHash of the ``have`` op (:func:`phash64`):
a client (nomad) computes it from its own decoded copy and asks whether the
gallery holds the image before spending CLIP on it. Every catalogue already
stores it (column ``coarse``), so no migration is needed.

Hashes are kept as packed uint64 words in imagehash's bit order.

At ingest the image given here is the reduced decode of
:func:`gallery_bridge.validate.check_image` (at least 750x384 px, not the full
size). For a photo above that size the hashes can therefore differ from those
of a full decode (scenery's, or what this gallery stored before the reduced
decode): measured on 3000x2000 and 4000x3000 photos, at most 12 of 576 phash
bits (threshold 64), 2 of 64 coarse bits (candidate threshold 18) and 1 grey
level per signature pixel. Old entries keep matching; ``gallery-bridge
rebuild`` recomputes them if wanted. tests/test_gallery_ingest_reduced.py holds
the tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image, ImageOps

from ..validate import upright

SIG_SIDE = 96
"""Side of the grey signature (scenery hashes a 96x96 grey image)."""
PHASH_SIZE = 24
"""576-bit hash: 24x24 lowest DCT coefficients of the 96x96 image (highfreq_factor 4)."""
PHASH_WORDS = PHASH_SIZE * PHASH_SIZE // 64
COARSE_SIZE = 8
"""64-bit hash of the 8x8 lowest DCT coefficients of a 32x32 image: robust to small crops."""


@dataclass(frozen=True)
class Fingerprint:
    """Everything dedup needs about one image, computed once at ingest."""

    phash: np.ndarray  # uint64[PHASH_WORDS]
    phash_mirror: np.ndarray  # uint64[PHASH_WORDS]
    coarse: np.ndarray  # uint64[1]
    coarse_mirror: np.ndarray  # uint64[1]
    signature: bytes  # 96x96 uint8 grey, row major

    @property
    def phash_hex(self) -> str:
        """The 576-bit hash as imagehash writes it (144 hex digits), scenery's notation."""
        return pack_bits_hex(self.phash)


def _bits_to_words(bits: np.ndarray) -> np.ndarray:
    """bool[...] flattened (imagehash order) -> big-endian-packed uint64 words."""
    packed = np.packbits(bits.reshape(-1).astype(np.uint8))
    return packed.view(">u8").astype(np.uint64)


def pack_bits_hex(words: np.ndarray) -> str:
    """uint64 words -> hex string in imagehash's bit order."""
    return words.astype(">u8").tobytes().hex()


def words_from_hex(text: str) -> np.ndarray:
    """Inverse of :func:`pack_bits_hex`."""
    return np.frombuffer(bytes.fromhex(text), dtype=">u8").astype(np.uint64)


def grey_signature(image: Image.Image) -> Image.Image:
    """The 96x96 grey image scenery's hash is computed from (EXIF orientation applied)."""
    image = upright(image)  # no copy of an image that is upright and 8-bit already
    # Exactly imagehash's own steps (convert, one LANCZOS resize), so the hash of
    # a given image is bit for bit what scenery computes; no reducing_gap shortcut. 16-bit grey
    # is scaled first (to_8bit): convert("L") would clip it to white.
    grey = image.convert("L")
    return grey.resize((SIG_SIDE, SIG_SIDE), Image.Resampling.LANCZOS)


def _coarse_hash(sig: Image.Image) -> imagehash.ImageHash:
    """The 64-bit DCT hash of a 96x96 signature (imagehash resizes it to 32x32)."""
    return imagehash.phash(sig, hash_size=COARSE_SIZE, highfreq_factor=4)


def phash64(image: Image.Image) -> str:
    """The ``have`` op's 64-bit pHash of a decoded image: 16 hex digits, the catalogue's ``coarse``.

    Cheap on a small copy: nomad hashes its 512x512 wire image (a squash of the
    whole photo, as the 96x96 signature is); measured on resized and
    recompressed copies, at most 2 bits from the gallery's full-size hash.
    """
    return have_hashes(image)[0]


def have_hashes(image: Image.Image) -> tuple[str, str]:
    """(64-bit pHash hex, 576-bit phash hex) of a decoded image, from one grey signature: a ``have`` item's hashes.

    The 576-bit one is the entries' ``phash`` (scenery's); with it the gallery
    answers ``near`` by its own ingest rule instead of the coarse 64 bits alone.
    From nomad's wire image it measured 0-6 bits from the full-size hash on copies.
    """
    sig = grey_signature(image)
    ph = imagehash.phash(sig, hash_size=PHASH_SIZE, highfreq_factor=SIG_SIDE // PHASH_SIZE)
    return pack_bits_hex(_bits_to_words(_coarse_hash(sig).hash)), pack_bits_hex(_bits_to_words(ph.hash))


def fingerprint(image: Image.Image) -> Fingerprint:
    """Compute all hashes and the signature of a decoded image."""
    sig = grey_signature(image)
    mirror = ImageOps.mirror(sig)
    ph = imagehash.phash(sig, hash_size=PHASH_SIZE, highfreq_factor=SIG_SIDE // PHASH_SIZE)
    phm = imagehash.phash(mirror, hash_size=PHASH_SIZE, highfreq_factor=SIG_SIDE // PHASH_SIZE)
    co = _coarse_hash(sig)
    com = _coarse_hash(mirror)
    return Fingerprint(
        phash=_bits_to_words(ph.hash),
        phash_mirror=_bits_to_words(phm.hash),
        coarse=_bits_to_words(co.hash),
        coarse_mirror=_bits_to_words(com.hash),
        signature=sig.tobytes(),
    )
