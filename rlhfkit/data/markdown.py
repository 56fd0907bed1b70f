"""HTML → Markdown for Stack Exchange bodies, with the maintained `markdownify` library.

Rules on top of markdownify's defaults:
* `<pre><code>` → fenced ``` blocks, tagged with the language when the post says it
  (`<pre class="lang-py">` or `<code class="language-python">`, newer dumps); inline `<code>` → `code`.
* links kept as [text](href); images → their alt text (the picture itself is lost anyway).
* headings in ATX style (`## Title`), bullets `-`.
* HTML entities are decoded (by the HTML parser); asterisks are escaped, underscores are not (an
  intraword `_` is never emphasis in CommonMark, and `snake\\_case` is noise in training text).
"""

from __future__ import annotations

from bs4 import Tag
from markdownify import MarkdownConverter

_LANG_PREFIXES = ("lang-", "language-")


def _code_language(pre) -> str:
    classes = list(pre.get("class") or [])
    code = pre.find("code", recursive=False)
    if code is not None:
        classes += list(code.get("class") or [])
    for cls in classes:
        for prefix in _LANG_PREFIXES:
            if cls.startswith(prefix) and cls[len(prefix):] not in ("", "none", "default"):
                return cls[len(prefix):]
    return ""


class _Tag(Tag):
    """bs4 Tag with a fast `find_parent(name)`: markdownify asks `node.find_parent('pre')` for every
    tag, and bs4's generic search (SoupStrainer per call) was ~25% of the conversion time."""

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
    """markdownify with the rules above."""

    def convert_img(self, el, text, parent_tags):
        return el.attrs.get("alt") or ""


_OPTIONS = dict(
    bs4_options={"features": "html.parser", "element_classes": {Tag: _Tag}},
    heading_style="atx",
    bullets="-",
    code_language_callback=_code_language,
    escape_underscores=False,
    escape_asterisks=True,
    escape_misc=False,
)
_converter: StackExchangeConverter | None = None


def html_to_markdown(html: str | None) -> str:
    """Markdown for one HTML body (empty string for None/empty), stripped of outer whitespace."""
    global _converter
    if not html:
        return ""
    if _converter is None:
        _converter = StackExchangeConverter(**_OPTIONS)
    return _converter.convert(html).strip()


def convert_lists(texts: list[list[str]]) -> list[list[str]]:
    """Convert lists of bodies (one list per question): the unit of work sent to converter processes,
    which import only this module (markdownify + bs4)."""
    return [[html_to_markdown(h) for h in ts] for ts in texts]
