"""The offline tiktoken GPT-2 encoding gives Hugging Face `tokenizers`' ids, string for string."""
from __future__ import annotations

import gzip
import json
import random
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from masep.data.tokenizer import (EOT, EOT_ID, N_VOCAB, bpe_files, encode_ordinary_numpy, get_tokenizer,
                                  tokenizer_identity)

SAMPLE = Path(__file__).resolve().parent.parent / "data/c4-sample/en/c4-train.00000-of-01024.json.gz"

WORDS = ["the", "The", "THE", "tokenizer", "naïve", "café", "Straße", "über", "résumé", "x",
         "don't", "I'm", "we'll", "they've", "you're", "it's", "he'd", "O'Neil", "'S", "'LL",
         "rock'n'roll", "''", "'", "’s", "can’t"]
CHUNKS = {
    "space": [" ", "  ", "   ", " " * 17, "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0",
              "\u3000", "\u2028", "\u2009", "\x0b", "\x0c", " \t \n"],
    "digits": ["0", "7", "42", "1999", "3.14159", "1,000,000", "٣٤٥", "²", "½", "Ⅻ", "12345678901234"],
    "punct": [".", ",", "!?", "...", "—", "–", "«»", "“quoted”", "(x)", "[]", "{}", "#!", "@@",
              "&amp;", "<b>", "</p>", "--", "~~~", "$", "€", "%", "^_^", "\\", "/*", "*/", "'"],
    "cjk": ["中文", "日本語のテキスト", "한국어", "漢字かなカナ", "繁體字", "。", "、", "！"],
    "emoji": ["🙂", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🤖", "🇫🇷", "🫠"],
    "combining": ["e\u0301", "a\u0308\u0304", "n\u0303", "\u0301", "Z\u0351\u0361\u0335",
                  "क्षि", "ما", "שָׁלוֹם", "ภาษาไทย"],
    "scripts": ["Привет", "Ελληνικά", "Հայերեն", "ქართული", "العربية", "हिन्दी", "தமிழ்", "ᚠᚢᚦ"],
    "control": ["\x00", "\x01", "\x1b[0m", "\x7f", "\u200b", "\u200d", "\ufeff", "\ufffd"],
    "special": [EOT, "<|endoftext", "|>", "<|endoftext|><|endoftext|>"],
}


def random_codepoint(rng: random.Random) -> str:
    while True:
        cp = rng.choice([rng.randrange(0x20, 0x3000), rng.randrange(0x3000, 0x10000),
                         rng.randrange(0x10000, 0x110000)])
        if not 0xD800 <= cp <= 0xDFFF:  # lone surrogates are not strings a document can hold
            return chr(cp)


def generated_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    kinds = list(CHUNKS) + ["word", "word", "word", "codepoint"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 24)):
            kind = rng.choice(kinds)
            if kind == "word":
                parts.append(rng.choice(WORDS))
            elif kind == "codepoint":
                parts.append("".join(random_codepoint(rng) for _ in range(rng.randint(1, 4))))
            else:
                parts.append(rng.choice(CHUNKS[kind]))
            if rng.random() < 0.5:
                parts.append(" ")
        out.append("".join(parts))
    return out


def sample_texts(n: int) -> list[str]:
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in islice(f, n)]


@pytest.fixture(scope="module")
def strings() -> list[str]:
    return generated_strings(4000) + sample_texts(200) + ["", " ", "\n", "a", EOT]


def hf_tokenizer(special: bool) -> Tokenizer:
    encoder, merges = bpe_files()
    tok = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if special:
        tok.add_special_tokens([EOT])
    return tok


def test_identity_and_vocabulary():
    enc = get_tokenizer()
    ident = tokenizer_identity()
    assert enc.n_vocab == N_VOCAB == ident["n_vocab"] == 50257
    assert enc.eot_token == EOT_ID == 50256
    # GPT-2's published files (the hashes tiktoken itself pins for them).
    assert ident["encoder_json_sha256"] == "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    assert ident["vocab_bpe_sha256"] == "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert get_tokenizer() is enc  # cached


def test_ids_match_hf_tokenizers_without_specials(strings):
    enc = get_tokenizer()
    hf = hf_tokenizer(special=False)
    ours = enc.encode_ordinary_batch(strings, num_threads=2)
    theirs = [e.ids for e in hf.encode_batch(strings, add_special_tokens=False)]
    mismatches = [(s, a, b) for s, a, b in zip(strings, ours, theirs) if a != b]
    assert not mismatches, f"{len(mismatches)} differ, first: {mismatches[0]!r}"
    # The shard writer's call: same ids, as uint32 arrays, with and without threads.
    for threads in (1, 2):
        arrays = encode_ordinary_numpy(strings, threads=threads)
        assert all(a.dtype == np.uint32 for a in arrays)
        assert [a.tolist() for a in arrays] == theirs
    assert sum(s.count(EOT) for s in strings) > 100  # <|endoftext|> really was exercised as text
    assert all(EOT_ID not in ids for ids in ours)


def test_ids_match_hf_tokenizers_with_eot_special(strings):
    enc = get_tokenizer()
    hf = hf_tokenizer(special=True)
    with_eot = [s for s in strings if EOT in s]
    ours = enc.encode_batch(with_eot, allowed_special={EOT}, num_threads=2)
    theirs = [e.ids for e in hf.encode_batch(with_eot, add_special_tokens=False)]
    assert ours == theirs
    assert all(ids.count(EOT_ID) == s.count(EOT) for s, ids in zip(with_eot, ours))
    with pytest.raises(ValueError):  # text that merely contains the marker is not a special token
        enc.encode(EOT)


def test_round_trip(strings):
    enc = get_tokenizer()
    for s, ids in zip(strings, enc.encode_ordinary_batch(strings, num_threads=2)):
        assert enc.decode(ids) == s
        assert all(0 <= i < N_VOCAB for i in ids)


@pytest.mark.parametrize("text", [
    "a" + " " * 1_000_000 + "b",  # tiktoken's regex alone overflows its stack on this one
    " " * 1_000_000,
    "end of text" + " " * 300_000,
    "x\n" + "\n" * 300_000 + " y" + "\t \n" * 5000 + "z" + " " * 4096 + "'s" + "\u3000" * 5000 + "中文",
    "line" + "\r\n" * 100_000 + "word" + " " * 4095 + "!" + " " * 4097 + "?",
])
def test_long_whitespace_runs_encode_to_gpt2_ids(text):
    """A document with a whitespace run of ~10^6 characters gets exactly the reference ids."""
    theirs = hf_tokenizer(special=False).encode(text, add_special_tokens=False).ids
    assert encode_ordinary_numpy([text])[0].tolist() == theirs
