"""anti_sus.text.tokenizer: the torch-free CLIP tokenizer gives open_clip's ids, and reads only well-formed vocabularies."""
from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import pytest

from anti_sus.text.tokenizer import CONTEXT_LENGTH, MAX_MERGES, Tokenizer, VocabError, clean, read_merges

HANDWRITTEN = [
    "", " ", "   \t\n  ", "a", "A photo of a cat.", "a photo of a CAT", "two dogs playing in the snow",
    "don't stop believin'", "it's, they're, we've, I'm, you'll, he'd", "IT'S SHOUTING", "o'clock", "rock'n'roll",
    "Crème brûlée", "naïve café résumé", "Ångström über straße", "São Paulo à noite", "Dvořák's Ñandú",
    "東京タワーの夜景", "北京 天安门", "서울의 밤", "Москва зимой", "Αθήνα", "עברית", "العربية الفصحى", "हिन्दी",
    "ภาษาไทย", "emoji 🐱🐶🦊", "🏔️ mountain ⛰️ lake 🌅", "👨‍👩‍👧‍👦 family", "🇯🇵 flag", "flags 🇫🇷🇩🇪",
    "cafÃ©", "â€œquotedâ€\x9d", "Ã¼ber", "The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.",
    "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp; double", "fish &amp; chips", "&quot;quoted&quot;", "&#39;apos&#39;",
    "&#x1F600; smiley", "&nbsp;non&nbsp;breaking", "<start_of_text>", "literal <end_of_text> inside",
    "1234567890", "3.14159 is pi", "2024-01-01T00:00:00Z", "$100 or €90 or £80", "50% off!!!", "#hashtag @user",
    "https://example.com/path?q=1&r=2", "email@example.org", "C++ and C# and F#", "snake_case and kebab-case",
    "tabs\tand\nnewlines\r\nmixed", "zero\u200bwidth", "soft\u00adhyphen", "ﬁ ligature ﬂ", "ＦＵＬＬＷＩＤＴＨ",
    "½ ¼ ¾ ² ³", "…ellipsis…", "— em dash – en dash", "“curly” ‘quotes’", "«guillemets»", "¿qué? ¡sí!",
    "mIxEd CaSe WoRdS", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
    "word " * 100, "日本語" * 60, "🙂" * 100, "a, " * 80, " ".join(str(i) for i in range(200)),
    "x" * 1000, "\u0000control\u0007chars\u001b", "\ufffd replacement", "combining e\u0301 accent",
]

WORDS = ["photo", "sunset", "mountain", "café", "naïve", "東京", "서울", "Москва", "🐱", "🌅", "&amp;", "&lt;",
         "don't", "it's", "42", "3.5", "C++", "#tag", "Ã©", "â€™", "   ", "\t", "ß", "ǅ", "İstanbul", "ﬃ",
         "Ⅻ", "①", "x²", "ΣΑΣ", "ﬆ", "<end_of_text>", "---", "!!!", "?", "…", "e\u0301", "\u200d"]


def corpus(n: int = 240, seed: int = 11) -> list[str]:
    """The hand-written strings plus random mixtures of words from many scripts (some past 77 tokens)."""
    rng = random.Random(seed)
    out = list(HANDWRITTEN)
    while len(out) < n:
        k = rng.choice([1, 2, 3, 5, 8, 13, 40, 90])
        out.append(rng.choice(["", " "]).join(rng.choice(WORDS) for _ in range(k)))
    return out


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    return pytest.importorskip("open_clip").tokenizer


def test_ids_equal_open_clips_on_many_strings(open_clip_tokenizer) -> None:
    texts = corpus()
    assert len(texts) >= 200
    ours = Tokenizer(open_clip_tokenizer.default_bpe())
    theirs = open_clip_tokenizer.tokenize(texts).numpy()
    mine = ours(texts)
    assert mine.dtype == np.int64 and mine.shape == (len(texts), CONTEXT_LENGTH)
    bad = [t for t, a, b in zip(texts, mine, theirs) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} strings differ, first: {bad[0]!r}"
    # The corpus really covers truncation, non-ASCII and the empty string.
    assert (mine[:, -1] == ours.eot_id).sum() >= 5
    assert any(ord(c) > 0x3000 for t in texts for c in t)
    assert ours.vocab_size == 49408 and (ours.sot_id, ours.eot_id) == (49406, 49407)


def test_clean_fixes_mojibake_entities_and_whitespace() -> None:
    assert clean("  Caf\u00c3\u00a9 &amp;amp;  Bar\n") == "café & bar"


def tiny_vocab(path: Path, merges: list[str], header: str = "#version: 0.2") -> Path:
    path.write_bytes(gzip.compress(("\n".join([header, *merges]) + "\n").encode("utf-8")))
    return path


def test_tiny_vocabulary_merges_by_rank(tmp_path: Path) -> None:
    tok = Tokenizer(tiny_vocab(tmp_path / "v.txt.gz", ["c a", "ca t</w>", "a a"]))
    # 256 bytes + 256 end-of-word + 3 merges + 2 special.
    assert tok.vocab_size == 517 and tok.sot_id == 515 and tok.eot_id == 516
    ids = tok("Cat aaa")[0]
    # "cat" -> "ca" + "t</w>" -> "cat</w>" (merge 1 = id 513); "aaa" -> "aa" (id 514) + "a</w>".
    a_end = 256 + tok.ids["a"]
    assert list(ids[:5]) == [515, 513, 514, a_end, 516] and not ids[5:].any()


def test_truncation_keeps_eot_last(tmp_path: Path) -> None:
    tok = Tokenizer(tiny_vocab(tmp_path / "v.txt.gz", ["a b"]), context_length=8)
    ids = tok("1 2 3 4 5 6 7 8 9")[0]
    assert len(ids) == 8 and ids[0] == tok.sot_id and ids[-1] == tok.eot_id


@pytest.mark.parametrize("content,why", [
    (b"not gzip at all", "cannot read"),
    (gzip.compress(b"#version\n"), "no merges"),
    (gzip.compress(b"#version\na b c\n"), "two symbols"),
    (gzip.compress(b"#version\n\xff\xfe\n"), "not UTF-8"),
])
def test_malformed_vocabularies_are_refused(tmp_path: Path, content: bytes, why: str) -> None:
    p = tmp_path / "v.txt.gz"
    p.write_bytes(content)
    with pytest.raises(VocabError, match=why):
        read_merges(p)


def test_only_clips_merges_are_read(tmp_path: Path) -> None:
    many = [f"{chr(0x4e00 + i // 200)} {chr(0x4e00 + i % 200)}" for i in range(MAX_MERGES + 10)]
    assert len(read_merges(tiny_vocab(tmp_path / "v.txt.gz", many))) == MAX_MERGES
