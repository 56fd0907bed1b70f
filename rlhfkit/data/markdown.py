"""HTML → Markdown for Stack Exchange bodies: `markdownify`, or its Rust port `markdownify-rs` when installed.

Rules on top of markdownify's defaults:
* `<pre><code>` → fenced ``` blocks, tagged with the language when the post says it
  (`<pre class="lang-py">` or `<code class="language-python">`, newer dumps); inline `<code>` → `code`.
* links kept as [text](href); images → their alt text (the picture itself is lost anyway).
* headings in ATX style (`## Title`), bullets `-`.
* HTML entities are decoded (by the HTML parser); asterisks are escaped, underscores are not (an
  intraword `_` is never emphasis in CommonMark, and `snake\\_case` is noise in training text).

Converters (env `RLHFKIT_MARKDOWN`): `python` (markdownify on BeautifulSoup), `rust` (markdownify-rs,
`pip install 'rlhfkit[fast]'`, much faster: docs/benchmarks.md), `auto` (default: rust when importable).
markdownify-rs has no hooks for the two custom rules, so a regex pre-pass applies them: each `<img>`
becomes a `<span>` holding a private-use placeholder (swapped for the alt text afterwards), and every
fence is opened with a sentinel language that is replaced, in order, by each `<pre>`'s language. Bodies
the pre-pass cannot vouch for (comments holding tags, `<script>`, odd attributes, empty `<pre>`...) go
to markdownify, so the output is the same with either converter; `FALLBACKS` counts them by reason in
this process.
"""

from __future__ import annotations

import html as _html
import os
import re
from collections import Counter

_LANG_PREFIXES = ("lang-", "language-")
_ENV = "RLHFKIT_MARKDOWN"
_CHOICES = ("auto", "python", "rust")


def _language(classes: list[str]) -> str:
    for cls in classes:
        for prefix in _LANG_PREFIXES:
            if cls.startswith(prefix) and cls[len(prefix) :] not in ("", "none", "default"):
                return cls[len(prefix) :]
    return ""


def _code_language(pre) -> str:
    classes = list(pre.get("class") or [])
    code = pre.find("code", recursive=False)
    if code is not None:
        classes += list(code.get("class") or [])
    return _language(classes)


# --------------------------------------------------------------------------- markdownify (Python)
_OPTIONS = dict(heading_style="atx", bullets="-", escape_underscores=False, escape_asterisks=True, escape_misc=False)
_python = None


def _python_converter():
    """markdownify with the rules above (imported on first use: bs4 is not needed on the Rust path)."""
    from bs4 import Tag
    from markdownify import MarkdownConverter

    class _Tag(Tag):
        """bs4 Tag with a fast `find_parent(name)`: markdownify asks `node.find_parent('pre')` for every
        tag, and bs4's generic search (SoupStrainer per call) was a large share of the conversion time."""

        def find_parent(self, name=None, attrs={}, **kwargs):  # noqa: B006 - bs4's signature
            if isinstance(name, str) and not attrs and not kwargs:
                node = self.parent
                while node is not None:
                    if node.name == name:
                        return node
                    node = node.parent
                return None
            return super().find_parent(name, attrs, **kwargs)

    class StackExchangeConverter(MarkdownConverter):
        def convert_img(self, el, text, parent_tags):
            return el.attrs.get("alt") or ""

    return StackExchangeConverter(
        bs4_options={"features": "html.parser", "element_classes": {Tag: _Tag}},
        code_language_callback=_code_language,
        **_OPTIONS,
    )


def python_markdown(html: str | None) -> str:
    """The markdownify conversion (the reference output)."""
    global _python
    if not html:
        return ""
    if _python is None:
        _python = _python_converter()
    return _python.convert(html).strip()


# --------------------------------------------------------------------------- markdownify-rs pre/post-pass
_FENCE = "\uf8ff"  # sentinel language of every fence; images are U+E000 + index
_MAX_IMAGES = 0xF8FF - 0xE000
_PUA = re.compile("[\ue000-\uf8ff]")
# html.parser treats these as raw text (version-dependent: 3.13+ adds several), so tags inside are not tags
_UNSAFE = re.compile(
    r"<(?:script|style|textarea|title|xmp|plaintext|iframe|noembed|noframes|noscript|/img|!(?!--))"
    r"|=\s*(?:\"[^\"]*|'[^']*)?<(?:img|pre)(?=[\s/>])",
    re.I,
)  # also: <img> in an attribute value
_COMMENT = re.compile(r"<!--(.*?)(-->|$)", re.S)
_ATTR = re.compile(r"""\s+([^\s"'>/=]+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s"'=<>`]+))?""")
_ATTRS = r"""((?:\s+[^\s"'>/=]+(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'=<>`]+))?)*)\s*(/?)>"""
_TAG_START = re.compile(r"<(img|pre)(?=[\t\n\r\f />])", re.I)  # html.parser's tag-name ends
_TAG = re.compile(r"<(img|pre)" + _ATTRS, re.I)
_FIRST_CODE = re.compile(r"[^<]*<code" + _ATTRS, re.I)
_PRE_END = re.compile(r"</pre", re.I)
_LANGISH = re.compile(r"lang(?:uage)?-", re.I)
_ALT_UNSAFE = re.compile(r"[^\S ]|  |^ | $|`")  # whitespace/backticks that markdownify would reshape
_HREF = re.compile(r"""\shref\s*=\s*("[^"]*"|'[^']*'|[^\s"'=<>`]+)""", re.I)
FALLBACKS: Counter = Counter()
_rust = None


def _attrs(raw: str) -> dict[str, str]:
    """Attributes as html.parser + bs4 give them: names lowercased, values unescaped, last duplicate wins."""
    out = {}
    for m in _ATTR.finditer(raw):
        value = m.group(2)
        if value is None:
            value = ""
        elif value[:1] in "\"'":
            value = value[1:-1]
        out[m.group(1).lower()] = _html.unescape(value)
    return out


def _classes(attrs: dict[str, str]) -> list[str]:
    return re.findall(r"\S+", attrs.get("class", ""))


def _prepass(html: str) -> tuple[str, list[str], list[str]] | str:
    """(html for markdownify-rs, alt texts, fence languages), or the reason to use markdownify instead."""
    if not _TAG_START.search(html):  # nothing to rewrite (most bodies)
        return html, [], []
    if not html.isascii() and _PUA.search(html):
        return "private_use_chars"
    if _UNSAFE.search(html):
        return "raw_text_or_attr"
    if "<!--" in html:
        for c in _COMMENT.finditer(html):
            if "<" in c.group(1) or not c.group(2):
                return "comment"
    parts, alts, langs, pos = [], [], [], 0
    hrefs = None
    for start in _TAG_START.finditer(html):
        if start.start() < pos:
            return "tag_in_tag"
        m = _TAG.match(html, start.start())
        if m is None:
            return "odd_tag"
        attrs = _attrs(m.group(2))
        parts.append(html[pos : m.start()])
        pos = m.end()
        if m.group(1).lower() == "img":
            alt = attrs.get("alt", "")
            if not alt:
                parts.append("<span></span>")
                continue
            if _ALT_UNSAFE.search(alt) or len(alts) >= _MAX_IMAGES:
                return "alt_text"
            if hrefs is None:
                hrefs = [_html.unescape(v[1:-1] if v[:1] in "\"'" else v) for v in _HREF.findall(html)]
            if any(alt in h for h in hrefs):  # markdownify would write <href> when a link's text == href
                return "alt_in_href"
            parts.append(f"<span>{chr(0xE000 + len(alts))}</span>")
            alts.append(alt)
            continue
        if m.group(3):
            return "self_closing_pre"
        parts.append(m.group(0))
        lang = _language(_classes(attrs))
        if not lang:
            code = _FIRST_CODE.match(html, m.end())
            if code is not None:  # the first tag in the <pre>: what find("code", recursive=False) returns
                lang = _language(_classes(attrs) + _classes(_attrs(code.group(1))))
            else:
                end = _PRE_END.search(html, m.end())
                end = end.start() if end else len(html)
                if _LANGISH.search(html, m.end(), end) or _TAG_START.search(html, m.end(), end):
                    return "pre_language"
        langs.append(lang)
    parts.append(html[pos:])
    return "".join(parts), alts, langs


def rust_markdown(html: str | None) -> str:
    """markdownify-rs with the pre-pass; markdownify for the bodies the pre-pass sends back."""
    global _rust
    if not html:
        return ""
    if _rust is None:
        import markdownify_rs

        _rust = markdownify_rs.MarkdownConverter(code_language=_FENCE, **_OPTIONS)
    prep = _prepass(html)
    if isinstance(prep, str):
        FALLBACKS[prep] += 1
        return python_markdown(html)
    body, alts, langs = prep
    md = _rust.convert(body)
    if _FENCE in md or langs:
        pieces = md.split("```" + _FENCE)
        if len(pieces) != len(langs) + 1:  # an empty <pre> gives no fence: the order would not match
            FALLBACKS["fence_count"] += 1
            return python_markdown(html)
        md = pieces[0] + "".join(f"```{lang}{piece}" for lang, piece in zip(langs, pieces[1:]))
    if alts:
        md = md.translate({0xE000 + i: alt for i, alt in enumerate(alts)})
    return md.strip()


# --------------------------------------------------------------------------- choice
def _choice() -> str:
    choice = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{_ENV}={choice!r}: expected one of {', '.join(_CHOICES)}")
    return choice


def rust_available() -> bool:
    try:
        import markdownify_rs  # noqa: F401
    except ImportError:
        return False
    return True


def converter() -> str:
    """'rust' or 'python': the converter `html_to_markdown` uses, from env RLHFKIT_MARKDOWN."""
    choice = _choice()
    if choice == "auto":
        return "rust" if rust_available() else "python"
    if choice == "rust" and not rust_available():
        raise ImportError(f"{_ENV}=rust needs markdownify-rs: pip install 'rlhfkit[fast]'")
    return choice


def converter_description() -> str:
    """One line for the logs: which converter, and why."""
    from importlib.metadata import version

    name = converter()
    if name == "rust":
        return f"markdownify-rs {version('markdownify-rs')} ({_ENV}={_choice()})"
    hint = "; pip install 'rlhfkit[fast]' for markdownify-rs" if _choice() == "auto" else ""
    return f"markdownify {version('markdownify')} ({_ENV}={_choice()}{hint})"


_convert = None


def html_to_markdown(html: str | None) -> str:
    """Markdown for one HTML body (empty string for None/empty), stripped of outer whitespace."""
    global _convert
    if _convert is None:
        _convert = rust_markdown if converter() == "rust" else python_markdown
    return _convert(html)


def convert_lists(texts: list[list[str]]) -> list[list[str]]:
    """Convert lists of bodies (one list per question): the unit of work sent to converter processes,
    which import only this module (and markdownify-rs or markdownify + bs4)."""
    return [[html_to_markdown(h) for h in ts] for ts in texts]
