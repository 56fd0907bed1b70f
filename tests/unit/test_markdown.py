"""HTML → Markdown: markdownify-rs (with the pre-pass for our image and code-language rules) must give the
same output as markdownify, on the fixture, on tricky snippets, on random markup and on a real dump."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from rlhfkit.data import build_stackexchange, markdown
from rlhfkit.runtime.errors import RlhfkitError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "stackexchange" / "tiny.stackexchange.com" / "Posts.xml"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "stackexchange"
REAL = SHARED / "coffee.stackexchange.com" / "Posts.xml"
needs_rust = pytest.mark.skipif(
    not markdown.rust_available(), reason="markdownify-rs not installed (pip install 'rlhfkit[fast]')"
)

SNIPPETS = [
    '<p>Run <code>x</code>, see <a href="https://ex.com/?a=1&amp;b=2">docs</a> and '
    '<img src="p.png" alt="a diagram">.</p>',
    '<pre class="lang-py s-code-block"><code>if a &lt; b:\n    pass\n</code></pre><pre><code>plain\n</code></pre>',
    '<pre class="s-code-block"><code class="hljs language-rust">fn main() {}\n</code></pre>',
    '<pre>\n  <code class="lang-c&#43;&#43;">int x;</code></pre>',  # text before the first <code>
    '<PRE CLASS="lang-none"><CODE class="language-js">x</CODE></PRE>',  # lang-none: fall through to <code>
    '<pre class="default lang-default"><code>x</code></pre><pre class="lang-sh" class="lang-bash">ls</pre>',
    '<ul><li>step<pre class="lang-go"><code>go run .\n</code></pre></li></ul>'
    '<blockquote><pre class="lang-py">q</pre></blockquote>',
    '<h2>Title <img alt="icon"></h2><table><tr><td><img alt="cell pic"> x</td></tr></table>',
    '<p>a <img alt=""> b <a href="big.png"><img src="small.png" alt=""></a> c</p>',
    '<p><a href="https://i.stack.imgur.com/x.png"><img src="https://i.stack.imgur.com/x.png" '
    'alt="enter image description here"></a></p>',
    "<p><img src='q.png' alt='2*3 &amp; caf&eacute;' title=\"t\"/><img alt=bare></p>"
    '<p><strong><img alt="bold"></strong></p>',
    '<pre><code><img alt="in code"> x</code></pre><p><code>a <img alt="inline"></code></p>',
    # sent to markdownify by the pre-pass, still identical:
    '<p><a href="logo"><img alt="logo"></a></p>',
    '<p><img alt=" spaced "> <code><img alt="`tick`"></code></p>',
    '<pre class="lang-py"></pre><pre class="lang-sh"><code>ls</code></pre>',
    '<pre class="lang-py"/><p>after</p>',
    '<!-- <img alt="hidden"> --><pre class="lang-py">x</pre>',
    '<script><img alt="s"></script><pre>x</pre>',
    '<a title="<img alt=t>" href="y">link</a><img alt="u">',
    '<p>\uf8ff apple <img alt="x"></p><pre>y</pre>',
    '<pre><span>x</span><code class="lang-py">y</code></pre>',
    '<pre><pre class="lang-py">in</pre>out</pre>',
]


def fixture_bodies(path: Path) -> list[str]:
    return [row.get("Body") for _, row in ET.iterparse(path) if row.tag == "row" and row.get("Body")]


def random_html(rng: random.Random) -> str:
    frags = [
        "<p>",
        "</p>",
        "text ",
        " ",
        "\n",
        "*star* ",
        "snake_case",
        '<a href="https://ex.com/a">',
        "</a>",
        '<img src="a.png" alt="pic">',
        '<img alt="">',
        "<img src=b.png>",
        '<IMG ALT="Big pic"/>',
        "<img alt='x*y'>",
        '<pre class="lang-py"><code>def f():\n    return 1\n</code></pre>',
        "<pre><code>\n\nx\n</code></pre>",
        '<pre class="prettyprint"><code class="language-rust">fn x() {}</code></pre>',
        "<pre>",
        "</pre>",
        "<code>",
        '<code class="language-c">',
        "</code>",
        "<h3>",
        "</h3>",
        "<ul><li>",
        "</li></ul>",
        "<blockquote>",
        "</blockquote>",
        "<!-- c -->",
        "<em>",
        "</em>",
        "<br>",
        "<td>",
        "<div>",
        "</div>",
        "&lt;pre&gt;",
        "<kbd>",
    ]
    return "".join(rng.choice(frags) for _ in range(rng.randint(1, 20)))


@needs_rust
def test_rust_matches_python_on_fixture_snippets_and_random_markup():
    rng = random.Random(0)
    bodies = fixture_bodies(FIXTURE) + SNIPPETS + [random_html(rng) for _ in range(300)]
    for html in bodies:
        assert markdown.rust_markdown(html) == markdown.python_markdown(html), html


@needs_rust
def test_rust_path_rules_on_fixture_and_snippets():
    before = sum(markdown.FALLBACKS.values())
    bodies = {b[:40]: b for b in fixture_bodies(FIXTURE)}
    dial = next(b for k, b in bodies.items() if "Set it to" in k)
    assert markdown.rust_markdown(dial) == "Set it to `espresso` and check the dial:\n\nthe grinder dial"
    grind = next(b for k, b in bodies.items() if "My grinder" in k)
    assert "\n\n```\ngrind --fine && tamp\n```\n\n" in markdown.rust_markdown(grind)  # no language, no sentinel
    assert markdown.rust_markdown(SNIPPETS[1]) == "```py\nif a < b:\n    pass\n```\n\n```\nplain\n```"
    assert markdown.rust_markdown(SNIPPETS[2]) == "```rust\nfn main() {}\n```"
    assert markdown.rust_markdown(SNIPPETS[3]).startswith("```c++\n")
    assert markdown.rust_markdown(SNIPPETS[4]) == "```js\nx\n```"
    assert markdown.rust_markdown(SNIPPETS[5]) == "```\nx\n```\n\n```bash\nls\n```"  # duplicate class: last wins
    assert markdown.rust_markdown(SNIPPETS[8]) == "a  b  c"
    assert markdown.rust_markdown(SNIPPETS[9]) == "[enter image description here](https://i.stack.imgur.com/x.png)"
    assert markdown.rust_markdown(SNIPPETS[10]) == "2*3 & cafébare\n\n**bold**"
    assert sum(markdown.FALLBACKS.values()) == before  # all of these took the Rust path


@needs_rust
@pytest.mark.skipif(not REAL.exists(), reason=f"real dump not found: {REAL} (../shared is absent)")
def test_rust_matches_python_on_every_body_of_a_real_dump():
    bodies = fixture_bodies(REAL)
    before = sum(markdown.FALLBACKS.values())
    mismatches = [b for b in bodies if markdown.rust_markdown(b) != markdown.python_markdown(b)]
    assert len(bodies) > 500 and not mismatches, mismatches[:3]
    assert sum(markdown.FALLBACKS.values()) - before <= len(bodies) // 100  # the pre-pass rarely gives up


def test_converter_choice_from_env(monkeypatch, tmp_path):
    monkeypatch.setattr(markdown, "_convert", None)
    monkeypatch.setenv("RLHFKIT_MARKDOWN", "python")
    assert markdown.converter() == "python" and "markdownify " in markdown.converter_description()
    assert markdown.html_to_markdown('<p><img alt="x"></p>') == "x" and markdown._convert is markdown.python_markdown
    monkeypatch.setenv("RLHFKIT_MARKDOWN", "auto")
    assert markdown.converter() == ("rust" if markdown.rust_available() else "python")
    monkeypatch.setattr(markdown, "rust_available", lambda: False)
    assert markdown.converter() == "python" and "rlhfkit[fast]" in markdown.converter_description()
    monkeypatch.setenv("RLHFKIT_MARKDOWN", "rust")
    with pytest.raises(ImportError, match="markdownify-rs"):
        markdown.converter()
    monkeypatch.setenv("RLHFKIT_MARKDOWN", "fortran")
    with pytest.raises(RlhfkitError, match="RLHFKIT_MARKDOWN"):
        build_stackexchange(FIXTURE, tmp_path / "out")


@needs_rust
def test_build_records_the_converter(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHFKIT_MARKDOWN", "rust")
    stats = build_stackexchange(FIXTURE, tmp_path / "out")
    assert stats["inputs"][0]["markdown_converter"] == "rust"
    stats = build_stackexchange(FIXTURE, tmp_path / "raw", markdown=False)
    assert stats["inputs"][0]["markdown_converter"] is None
