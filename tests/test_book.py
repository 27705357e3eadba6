"""The book builds offline, strictly, and its pages load nothing from another host.

The build is the same command as `make book`, so an author who breaks a chapter (a cell that
raises, a broken cross-reference, a warning) sees it here and in CI.
"""

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
JUPYTER_BOOK = Path(sys.executable).parent / "jupyter-book"


@pytest.fixture(scope="module")
def built_book():
    """Build the book once for this module; fail with the tail of the log if it does not build."""
    env = dict(os.environ, PATH=f"{JUPYTER_BOOK.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(
        [str(JUPYTER_BOOK), "build", ".", "--builder", "html", "-W", "-n", "--keep-going"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"jupyter-book build failed:\n{log[-6000:]}"
    return HTML


class _ResourceCollector(HTMLParser):
    """Collects what a browser would fetch on load: scripts, stylesheets, images, icons, frames."""

    def __init__(self):
        super().__init__()
        self.loads = []   # (tag, url)
        self.links = []   # <a href> targets

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "video", "audio") and attrs.get("src"):
            self.loads.append((tag, attrs["src"]))
        elif tag == "link" and attrs.get("href"):
            self.loads.append((tag, attrs["href"]))
        elif tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])


def _pages(html_root):
    return sorted(p for p in html_root.rglob("*.html") if "_static" not in p.parts)


def _is_remote(url):
    return bool(re.match(r"^(https?:)?//", url))


def test_book_has_landing_page_and_chapter_zero(built_book):
    assert (built_book / "index.html").is_file()
    assert (built_book / "book" / "00-big-picture.html").is_file()


def test_pages_load_nothing_from_another_host(built_book):
    remote = []
    for page in _pages(built_book):
        collector = _ResourceCollector()
        collector.feed(page.read_text(encoding="utf-8"))
        remote += [f"{page.relative_to(built_book)}: <{tag}> {url}"
                   for tag, url in collector.loads if _is_remote(url)]
    assert not remote, "pages load remote resources:\n" + "\n".join(remote)


def test_stylesheets_fetch_no_remote_fonts_or_images(built_book):
    offenders = []
    for css in (built_book / "_static").rglob("*.css"):
        text = css.read_text(encoding="utf-8", errors="replace")
        for url in re.findall(r"url\(\s*['\"]?([^'\")]+)", text):
            if _is_remote(url):
                offenders.append(f"{css.relative_to(built_book)}: {url}")
    assert not offenders, "stylesheets reference remote files:\n" + "\n".join(offenders)


def test_math_is_rendered_by_a_local_mathjax(built_book):
    page = built_book / "book" / "00-big-picture.html"
    collector = _ResourceCollector()
    collector.feed(page.read_text(encoding="utf-8"))
    mathjax = [url for tag, url in collector.loads if tag == "script" and "mathjax" in url.lower()]
    assert mathjax, "chapter 0 loads no MathJax script, so its math would stay raw"
    for url in mathjax:
        assert not _is_remote(url), f"MathJax comes from another host: {url}"
        assert (page.parent / url.split("?")[0]).resolve().is_file(), f"MathJax file missing: {url}"
    # MathJax's CommonHTML output needs its web fonts next to the script.
    fonts = list((built_book / "_static" / "mathjax").rglob("*.woff*"))
    assert fonts, "MathJax fonts were not copied into _static/mathjax"


def test_internal_links_resolve(built_book):
    broken = []
    for page in _pages(built_book):
        collector = _ResourceCollector()
        collector.feed(page.read_text(encoding="utf-8"))
        for href in collector.links + [url for _, url in collector.loads]:
            if _is_remote(href) or href.startswith(("#", "mailto:", "javascript:", "data:")):
                continue
            target = (page.parent / href.split("#")[0].split("?")[0]).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(built_book)} -> {href}")
    assert not broken, "broken internal links:\n" + "\n".join(broken)
