"""Rebuild the embedded sample: Python 3.11's documentation, written in C4's file format.

This is NOT C4. It is real English prose (the CPython documentation, PSF licence) cut into
C4-sized documents and written exactly as C4's `en/c4-train.XXXXX-of-01024.json.gz` files
are: gzip'd JSON lines with `text`, `timestamp` and `url`. See README.md beside this file.

    python data/c4-sample/make_sample.py                # fetches the .deb with apt-get download
    python data/c4-sample/make_sample.py --deb FILE.deb # or use a .deb fetched beforehand

The .deb's SHA-256 is checked, extraction is pure Python (ar + tar), and the gzip header
carries no time stamp, so the output is byte-identical on every rebuild.
"""
from __future__ import annotations

import argparse
import datetime as dt
import email.utils
import gzip
import hashlib
import html.parser
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "python3.11-doc"
VERSION = "3.11.2-6+deb12u9"
DEB_SHA256 = "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be"
HTML_ROOT = "usr/share/doc/python3.11/html/"
CHANGELOG = "usr/share/doc/python3.11-doc/changelog.Debian.gz"
BASE_URL = "https://docs.python.org/3.11/"
# Documentation sections holding prose; genindex/search/etc. pages are navigation only.
SECTIONS = ("tutorial", "reference", "library", "howto", "faq", "using", "extending",
            "c-api", "whatsnew", "installing", "distributing")
SHARDS = 2

# Line and page filters modelled on C4's cleaning (Raffel et al. 2020, section 2.2).
END_MARKS = (".", "?", "!", '"', "\u201d")
MIN_WORDS_PER_LINE = 3
MIN_SENTENCES = 3
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies")

BLOCK_TAGS = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "div",
              "section", "table", "tr", "td", "th", "blockquote", "dl", "ul", "ol", "hr", "br"}
SKIP_TAGS = {"pre", "script", "style"}  # code blocks: C4 drops code lines anyway


class SectionText(html.parser.HTMLParser):
    """Collect the main body of a Sphinx page as lines, one document per level-2 section."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.docs: list[tuple[str, list[str]]] = [("", [])]  # (anchor, lines)
        self.line: list[str] = []
        self.in_main = 0  # depth of open divs inside role="main" (0: outside)
        self.section_depth = 0
        self.skip = 0
        self.headerlink = 0

    def flush(self):
        text = " ".join("".join(self.line).split())
        if text:
            self.docs[-1][1].append(text)
        self.line = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if not self.in_main:
            if tag == "div" and a.get("role") == "main":
                self.in_main = 1
            return
        if tag == "div":
            self.in_main += 1
        if tag in BLOCK_TAGS:
            self.flush()
        if tag == "section":
            self.section_depth += 1
            if self.section_depth == 2:
                self.docs.append((a.get("id", ""), []))
        if tag in SKIP_TAGS:
            self.skip += 1
        if tag == "a" and "headerlink" in (a.get("class") or ""):
            self.headerlink += 1

    def handle_endtag(self, tag):
        if not self.in_main:
            return
        if tag in BLOCK_TAGS:
            self.flush()
        if tag == "section":
            if self.section_depth == 2:
                self.docs.append(("", []))  # text after a level-2 section, if any
            self.section_depth -= 1
        if tag in SKIP_TAGS:
            self.skip -= 1
        if tag == "a" and self.headerlink:
            self.headerlink -= 1
        if tag == "div":
            self.in_main -= 1

    def handle_data(self, data):
        if self.in_main and not self.skip and not self.headerlink:
            self.line.append(data)


def clean_lines(lines: list[str]) -> str | None:
    kept = []
    for line in lines:
        low = line.lower()
        if not line.endswith(END_MARKS) or len(line.split()) < MIN_WORDS_PER_LINE:
            continue
        if "javascript" in low or "{" in line or any(p in low for p in POLICY):
            continue
        kept.append(line)
    text = "\n".join(kept)
    if len(re.findall(r"[.?!](?:\s|$)", text)) < MIN_SENTENCES or "lorem ipsum" in text.lower():
        return None
    return text


def read_deb(deb: Path) -> dict[str, bytes]:
    """Members of the package's data.tar.* (a .deb is an `ar` archive)."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise SystemExit(f"{deb}: not a .deb (ar) archive")
    pos, files = 8, {}
    while pos < len(blob):
        name = blob[pos:pos + 16].decode().strip().rstrip("/")
        size = int(blob[pos + 48:pos + 58].decode().strip())
        start = pos + 60
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(blob[start:start + size])) as tar:
                for m in tar.getmembers():
                    if m.isfile():
                        files[m.name.removeprefix("./")] = tar.extractfile(m).read()
        pos = start + size + (size & 1)
    return files


def package_timestamp(files: dict[str, bytes]) -> str:
    """Date of the package's own release (its changelog's first trailer), as C4 writes dates."""
    log = gzip.decompress(files[CHANGELOG]).decode()
    trailer = re.search(r"^ -- .*?>  (.+)$", log, re.M).group(1)
    when = email.utils.parsedate_to_datetime(trailer).astimezone(dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def documents(files: dict[str, bytes]):
    timestamp = package_timestamp(files)
    pages = sorted(p for p in files if p.startswith(HTML_ROOT) and p.endswith(".html")
                   and p[len(HTML_ROOT):].split("/")[0] in SECTIONS)
    for path in pages:
        rel = path[len(HTML_ROOT):]
        parser = SectionText()
        parser.feed(files[path].decode("utf-8"))
        parser.close()
        parser.flush()
        for anchor, lines in parser.docs:
            text = clean_lines(lines)
            if text:
                url = BASE_URL + rel + (f"#{anchor}" if anchor else "")
                yield {"text": text, "timestamp": timestamp, "url": url}


def shard_of(url: str) -> int:
    return hashlib.blake2b(url.encode(), digest_size=8).digest()[0] % SHARDS


def write_shard(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for d in docs:
            gz.write((json.dumps(d, ensure_ascii=False) + "\n").encode("utf-8"))
    tmp.replace(path)


def fetch_deb(workdir: Path) -> Path:
    subprocess.run(["apt-get", "download", f"{PACKAGE}={VERSION}"], cwd=workdir, check=True)
    return next(workdir.glob(f"{PACKAGE}_*.deb"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deb", type=Path, help=f"{PACKAGE} {VERSION} .deb (default: apt-get download)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb or fetch_deb(Path(tmp))
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        if digest != DEB_SHA256:
            print(f"{deb}: sha256 {digest} is not {PACKAGE} {VERSION}'s {DEB_SHA256}", file=sys.stderr)
            return 1
        files = read_deb(deb)
    shards: list[list[dict]] = [[] for _ in range(SHARDS)]
    for doc in documents(files):
        shards[shard_of(doc["url"])].append(doc)
    for i, docs in enumerate(shards):
        path = args.out / "en" / f"c4-train.{i:05d}-of-01024.json.gz"
        write_shard(path, docs)
        chars = sum(len(d["text"]) for d in docs)
        print(f"{path}: {len(docs)} documents, {chars} characters, {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
