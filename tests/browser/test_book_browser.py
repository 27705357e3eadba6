"""The built book, read in headless Chromium the way a learner reads it.

Every page of ``_build/html`` (the landing page, every chapter in ``_toc.yml`` and any other page
the build wrote, but not ``_static``, ``genindex`` or ``search``) is served on 127.0.0.1 and
opened once at a desktop width and once at a phone width. On every page:

- no console errors and no uncaught script errors, no failed request and no HTTP error;
- no request to any host but 127.0.0.1 (requests elsewhere are recorded, aborted and reported);
- every ``<img>`` loaded (scrolled into view, natural width > 0);
- every math element rendered by MathJax (an ``mjx-container`` in every ``.math``, no MathJax
  error, no raw ``$$``, ``\\(``, ``\\[`` or ``\\begin{`` left in the visible text);
- every internal link answers 200 and every ``#fragment`` it names exists on its target page;
- at 375 px wide the page does not scroll sideways (the failure names the elements that stick
  out).

Full-page screenshots of the landing page and two chapters go to ``_build/screenshots/``.
"""

import functools
import http.server
import os
import re
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HTML = Path(os.environ.get("QKV_BOOK_HTML") or ROOT / "_build" / "html").resolve()  # as conftest
SCREENSHOTS = ROOT / "_build" / "screenshots"

pytestmark = pytest.mark.browser

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 812}
SKIP_TOP = {"genindex.html", "search.html"}
# Landing page and two chapters with figures and math: screenshot name -> page.
SCREENSHOT_PAGES = {
    "landing": "index.html",
    "chapter-01-tokens-and-embeddings": "book/01-tokens-and-embeddings.html",
    "chapter-04-scores-and-softmax": "book/04-scores-and-softmax.html",
}
PAGE_TIMEOUT_MS = 30_000


# --- which pages ----------------------------------------------------------------------------

def _toc_pages():
    """index.html plus one page per file named in _toc.yml (the book's own list of pages)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk({k: v for k, v in toc.items() if k != "root"})
    return ["index.html"] + [re.sub(r"\.(md|ipynb)$", "", f) + ".html" for f in files]


def built_pages(html_root=HTML):
    """The HTML pages of a build: not _static/_sources/_images, genindex, search or hidden dirs."""
    if not html_root.is_dir():
        return []
    pages = []
    for p in html_root.rglob("*.html"):
        rel = p.relative_to(html_root)
        if any(part.startswith(("_", ".")) for part in rel.parts[:-1]):
            continue
        if len(rel.parts) == 1 and rel.name in SKIP_TOP:
            continue
        pages.append(rel.as_posix())
    return pages


def _all_pages():
    # The toc names the pages even before the first build; a build that exists adds any other
    # page it wrote, so no page goes unvisited.
    return sorted(set(_toc_pages()) | set(built_pages()))


PAGES = _all_pages()


# --- server ---------------------------------------------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def book_url(built_book):
    """_build/html served on 127.0.0.1 at a free port, in a background thread."""
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


class _Ids(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k == "id" or (k == "name" and tag == "a"):
                self.ids.add(v)


@functools.lru_cache(maxsize=None)
def _fetch(url):
    """(HTTP status, ids in the page when it is HTML) for a same-origin URL without fragment."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body, status, ctype = resp.read(), resp.status, resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, frozenset()
    if "html" not in ctype:
        return status, frozenset()
    parser = _Ids()
    parser.feed(body.decode("utf-8", errors="replace"))
    return status, frozenset(parser.ids)


# --- one visit per page and width -----------------------------------------------------------

def _meta_refresh_target(page_rel):
    """The URL a page sends the browser on to with <meta http-equiv="refresh">, or None."""
    path = HTML / page_rel
    if not path.is_file():
        return None
    m = re.search(r'<meta[^>]+http-equiv=["\']?refresh["\']?[^>]*content=["\'][^"\']*'
                  r'url=([^"\'>]+)',
                  path.read_text(encoding="utf-8", errors="replace"), re.IGNORECASE)
    return m.group(1).strip() if m else None


def _browser_noise(url):
    """Chromium's own request for /favicon.ico (no page asks for it; a 404 there is no error)."""
    return urlsplit(url).path == "/favicon.ico"


_WAIT_FOR_MATHJAX = """async () => {
  if (!document.querySelector('script[src*="mathjax" i]')) return 'no-mathjax';
  const t0 = Date.now();
  while (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
    if (Date.now() - t0 > 20000) return 'mathjax-never-started';
    await new Promise(r => setTimeout(r, 50));
  }
  await MathJax.startup.promise;
  return 'typeset';
}"""

_IMAGES = """async () => {
  const out = [];
  for (const img of Array.from(document.images)) {
    img.loading = 'eager';
    img.scrollIntoView({block: 'center'});
    if (!img.complete) {
      await Promise.race([
        new Promise(r => { img.addEventListener('load', r, {once: true});
                           img.addEventListener('error', r, {once: true}); }),
        new Promise(r => setTimeout(r, 10000)),
      ]);
    }
    out.push({src: img.currentSrc || img.src, alt: img.alt, complete: img.complete,
              naturalWidth: img.naturalWidth});
  }
  window.scrollTo(0, 0);
  return out;
}"""

_MATH = """() => {
  const article = document.querySelector('article') || document.querySelector('main')
                  || document.body;
  const skip = 'pre, code, script, style, textarea, mjx-container, .highlight, .MathJax';
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  const texts = [];
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!el || el.closest(skip)) continue;
    if (el.checkVisibility && !el.checkVisibility()) continue;
    texts.push(n.data);
  }
  const math = Array.from(document.querySelectorAll('.math'));
  const raw = math.filter(m => !m.querySelector('mjx-container'))
                  .map(m => m.textContent.trim().slice(0, 120));
  const errors = Array.from(document.querySelectorAll('mjx-merror'))
                  .map(e => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 200));
  return {text: texts.join(''), mathElements: math.length,
          rendered: document.querySelectorAll('mjx-container').length,
          unrendered: raw, errors: errors};
}"""

_LINKS = """() => Array.from(document.querySelectorAll('a[href]')).map(a => ({
  href: a.href, raw: a.getAttribute('href'), text: a.textContent.trim().slice(0, 60)}))"""

_SAME_PAGE_IDS = """(ids) => ids.filter(id => !document.getElementById(id) &&
                                      !document.getElementsByName(id).length)"""

_OVERFLOW = """(vw) => {
  const doc = document.documentElement;
  const result = {innerWidth: window.innerWidth, docScrollWidth: doc.scrollWidth,
                  bodyScrollWidth: document.body.scrollWidth, culprits: []};
  if (Math.max(doc.scrollWidth, document.body.scrollWidth) <= vw + 1) return result;
  // an element inside a box that clips or scrolls sideways, or inside a fixed box (the theme's
  // off-canvas drawers), cannot widen the page
  const clips = el => {
    if (getComputedStyle(el).position === 'fixed') return true;
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      const cs = getComputedStyle(a);
      if (cs.overflowX !== 'visible' || cs.position === 'fixed') return true;
    }
    return false;
  };
  const sticksOut = el => {
    const r = el.getBoundingClientRect();
    return r.right > vw + 1 && r.width > 0 && !clips(el);
  };
  const describe = el => {
    let d = el.tagName.toLowerCase();
    if (el.id) d += '#' + el.id;
    if (typeof el.className === 'string' && el.className.trim())
      d += '.' + el.className.trim().split(/\\s+/).join('.');
    const sec = el.closest('section[id]');
    const r = el.getBoundingClientRect();
    return {element: d, section: sec ? sec.id : null, left: Math.round(r.left),
            right: Math.round(r.right), width: Math.round(r.width),
            text: (el.textContent || '').trim().replace(/\\s+/g, ' ').slice(0, 80)};
  };
  for (const el of document.body.querySelectorAll('*')) {
    if (!sticksOut(el)) continue;
    const parent = el.parentElement;
    // report the outermost element that sticks out, not each of its children
    if (parent && parent !== document.body && sticksOut(parent)) continue;
    result.culprits.push(describe(el));
    if (result.culprits.length >= 10) break;
  }
  return result;
}"""


@pytest.fixture(scope="session")
def visit(browser, book_url, only_local_requests):
    """visit(page, width) -> what the browser saw on that page; each (page, width) opened once."""
    cache = {}

    def _visit(page_rel, size_name):
        key = (page_rel, size_name)
        if key not in cache:
            cache[key] = _open(browser, book_url, page_rel, size_name, only_local_requests)
        return cache[key]

    return _visit


def _open(browser, base, page_rel, size_name, only_local_requests):
    phone = size_name == "phone"
    # The phone check uses a plain 375 px window rather than mobile emulation: an emulated phone
    # widens its layout viewport to fit content that overflows, which would hide the overflow.
    context = browser.new_context(viewport=PHONE if phone else DESKTOP, service_workers="block")
    only_local_requests(context)
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    seen = {"requests": [], "console_errors": [], "page_errors": [], "failed": [],
            "http_errors": []}
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("console", lambda m: m.type == "error" and not _browser_noise(
        m.location.get("url", "")) and seen["console_errors"].append(
        f"{m.text} ({m.location.get('url', '')}:{m.location.get('lineNumber', '')})"))
    page.on("pageerror", lambda e: seen["page_errors"].append(str(e)))
    page.on("requestfailed", lambda r: seen["failed"].append(f"{r.url}: {r.failure}"))
    page.on("response", lambda r: r.status >= 400 and not _browser_noise(r.url)
            and seen["http_errors"].append(f"{r.status} {r.url}"))
    try:
        page.goto(base + page_rel, wait_until="load")
        redirect = _meta_refresh_target(page_rel)
        if redirect:  # the root index.html sends the reader on to the book's first page
            page.wait_for_url(urljoin(base + page_rel, redirect), wait_until="load")
        seen["final_url"] = page.url
        seen["mathjax"] = page.evaluate(_WAIT_FOR_MATHJAX)
        page.evaluate("document.fonts.ready.then(() => true)")
        if phone:
            seen["overflow"] = page.evaluate(_OVERFLOW, PHONE["width"])
        else:
            seen["images"] = page.evaluate(_IMAGES)
            seen["math"] = page.evaluate(_MATH)
            seen["links"] = page.evaluate(_LINKS)
            same_page = sorted({urldefrag(link["href"])[1] for link in seen["links"]
                                if link["href"].split("#")[0] == page.url.split("#")[0]
                                and "#" in link["href"] and urldefrag(link["href"])[1]})
            seen["missing_same_page_ids"] = page.evaluate(_SAME_PAGE_IDS, same_page)
            for name, rel in SCREENSHOT_PAGES.items():
                if rel == page_rel:
                    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                    page.evaluate("window.scrollTo(0, 0)")
                    path = SCREENSHOTS / f"{name}.png"
                    page.screenshot(path=str(path), full_page=True)
                    seen["screenshot"] = path
        page.wait_for_timeout(100)  # let late console messages arrive
    finally:
        context.close()
    return seen


# --- the checks -----------------------------------------------------------------------------

def _fmt(items):
    return "\n  ".join(str(i) for i in items)


def test_the_checks_catch_a_broken_page(browser, book_url, only_local_requests):
    """The harness itself: a page with a remote image, raw TeX and a script error is caught."""
    context = browser.new_context(viewport=DESKTOP)
    only_local_requests(context)
    page = context.new_page()
    requests, errors = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(book_url + "book/index.html", wait_until="load")
        page.evaluate("""() => {
            const img = document.createElement('img');
            img.src = 'https://example.com/remote.png';
            document.querySelector('article').append(img, 'raw \\\\(x^2\\\\) here');
            setTimeout(() => { throw new Error('boom'); }, 0);
        }""")
        page.wait_for_timeout(500)
        math = page.evaluate(_MATH)
        images = page.evaluate(_IMAGES)
    finally:
        context.close()
    assert "https://example.com/remote.png" in requests
    assert any("boom" in e for e in errors)
    assert "\\(x^2\\)" in math["text"]
    assert any(i["src"].startswith("https://example.com") and i["naturalWidth"] == 0
               for i in images)


def test_the_toc_pages_were_built(built_book):
    missing = [p for p in _toc_pages() if not (built_book / p).is_file()]
    assert not missing, f"pages in _toc.yml that the build did not write: {missing}"


def test_every_built_page_is_visited(built_book):
    unvisited = sorted(set(built_pages(built_book)) - set(PAGES))
    assert not unvisited, f"the build wrote pages this module does not visit: {unvisited}"


@pytest.mark.parametrize("page", PAGES)
def test_no_console_errors_and_no_failed_requests(visit, page):
    seen = visit(page, "desktop")
    problems = ([f"console error: {e}" for e in seen["console_errors"]]
                + [f"script error: {e}" for e in seen["page_errors"]]
                + [f"request failed: {e}" for e in seen["failed"]]
                + [f"HTTP {e}" for e in seen["http_errors"]])
    assert not problems, f"{page}:\n  {_fmt(problems)}"


@pytest.mark.parametrize("page", PAGES)
def test_requests_stay_on_127_0_0_1(visit, page):
    foreign = []
    for size in ("desktop", "phone"):
        for url in visit(page, size)["requests"]:
            parts = urlsplit(url)
            if parts.scheme in ("data", "blob", "about"):
                continue
            if parts.hostname != "127.0.0.1":
                foreign.append(url)
    assert not foreign, f"{page} asks another host for:\n  {_fmt(sorted(set(foreign)))}"


@pytest.mark.parametrize("page", PAGES)
def test_images_load(visit, page):
    images = visit(page, "desktop")["images"]
    broken = [i for i in images if not i["complete"] or i["naturalWidth"] <= 0]
    assert not broken, f"{page}: images that did not load:\n  {_fmt(broken)}"


@pytest.mark.parametrize("page", PAGES)
def test_math_is_rendered(visit, page):
    seen = visit(page, "desktop")
    math = seen["math"]
    if math["mathElements"]:
        assert seen["mathjax"] == "typeset", (
            f"{page} has {math['mathElements']} math elements but MathJax: {seen['mathjax']}")
    assert not math["errors"], f"{page}: MathJax could not typeset:\n  {_fmt(math['errors'])}"
    assert not math["unrendered"], (
        f"{page}: {len(math['unrendered'])} of {math['mathElements']} math elements were not "
        f"rendered, e.g.:\n  {_fmt(math['unrendered'][:5])}")
    assert math["rendered"] >= math["mathElements"]
    text = math["text"]
    raw = []
    for marker in ("$$", "\\(", "\\)", "\\[", "\\]", "\\begin{"):
        i = text.find(marker)
        if i >= 0:
            raw.append(f"{marker!r} in ...{text[max(0, i - 60):i + 60]!r}...")
    # $...$ around a TeX command: dollar math the parser did not pick up
    for m in re.finditer(r"\$[^$\n]{0,120}?\\[A-Za-z]+[^$\n]{0,120}?\$", text):
        raw.append(f"raw dollar math: {m.group(0)!r}")
    assert not raw, f"{page}: raw TeX left in the visible text:\n  {_fmt(raw)}"


@pytest.mark.parametrize("page", PAGES)
def test_internal_links_resolve(visit, page, book_url):
    seen = visit(page, "desktop")
    origin = urlsplit(book_url).netloc
    broken = [f"#{i} (same page) has no target" for i in seen["missing_same_page_ids"]]
    for link in seen["links"]:
        parts = urlsplit(link["href"])
        if parts.scheme not in ("http", "https") or parts.netloc != origin:
            continue
        target, fragment = urldefrag(link["href"])
        status, ids = _fetch(target)
        if status != 200:
            broken.append(f"{link['raw']} ({link['text']!r}) -> HTTP {status}")
        elif fragment and target != seen["final_url"].split("#")[0] and ids \
                and fragment not in ids:
            broken.append(f"{link['raw']} ({link['text']!r}): no id {fragment!r} on {target}")
    assert not broken, f"{page}: broken internal links:\n  {_fmt(sorted(set(broken)))}"


@pytest.mark.parametrize("page", PAGES)
def test_readable_at_phone_width(visit, page):
    o = visit(page, "phone")["overflow"]
    width = max(o["docScrollWidth"], o["bodyScrollWidth"])
    assert width <= PHONE["width"] + 1, (
        f"{page} scrolls sideways at {PHONE['width']} px: the page is {width} px wide "
        f"(innerWidth {o['innerWidth']}). Elements that stick out:\n  {_fmt(o['culprits'])}")


@pytest.mark.parametrize("name", sorted(SCREENSHOT_PAGES))
def test_screenshot_saved(visit, name):
    seen = visit(SCREENSHOT_PAGES[name], "desktop")
    path = Path(seen.get("screenshot", SCREENSHOTS / f"{name}.png"))
    assert path.is_file() and path.stat().st_size > 10_000, f"no screenshot at {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
