"""The prose of a documentation page in HTML: the text of its main content element, without the
site's navigation, scripts or styles, with a blank line between blocks (paragraphs, headings,
list items, code blocks) so that a corpus can cut it at paragraphs like a .txt file.

Documentation generators mark their main content differently (Sphinx themes a div with
role="main" or a theme's own id, DocBook a div per chapter or reference page, mdBook a <main>), so
the caller names it: a `Selector` is the tag or the (attribute, value) pairs whose element is kept,
and those inside it that are dropped. The standard library's html.parser does the parsing; it
copes with the unclosed tags that such pages have (<p>, <li>, <dt>).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser

# elements with no end tag: never pushed on the open-element stack
_VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())
# elements whose start and end begin a new paragraph in the text
_BLOCK = frozenset(
    "address article aside blockquote caption dd details div dl dt fieldset figcaption figure "
    "footer h1 h2 h3 h4 h5 h6 header hr li main ol p pre section summary table tbody td tfoot "
    "th thead tr ul".split()
)
# elements never shown as text
_HIDDEN = frozenset("script style noscript template head title nav button svg".split())
# where a paragraph break goes into the text
_BREAK = "\x00"


@dataclass(frozen=True)
class Selector:
    """Which part of a page is kept. An element is kept (with all it holds) when its tag is in
    `tags` or one of its attributes matches a `keep` pair: ("class", "body") matches an element
    whose class list has "body", ("id", "docs-body") one whose id is exactly that. Inside a kept
    element, an element matching a `drop` pair is left out (a "¶" link, a sidebar, a table of
    contents)."""

    keep: tuple[tuple[str, str], ...] = ()
    tags: tuple[str, ...] = ()
    drop: tuple[tuple[str, str], ...] = ()


def _matches(attrs: list[tuple[str, str | None]], pairs: tuple[tuple[str, str], ...]) -> bool:
    for name, value in attrs:
        if value is None:
            continue
        for want_name, want in pairs:
            if name == want_name and (value == want or (name == "class" and want in value.split())):
                return True
    return False


class _Extractor(HTMLParser):
    def __init__(self, sel: Selector) -> None:
        super().__init__(convert_charrefs=True)
        self.sel = sel
        self.stack: list[str] = []
        self.keep_at: int | None = None  # stack depth of the kept element we are inside
        self.hide_at: int | None = None  # stack depth of the dropped/hidden element we are inside
        self.pre = 0  # how many <pre> we are inside: their whitespace is kept
        self.out: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            if tag in ("br", "hr") and self._shown():
                self.out.append("\n" if tag == "br" else _BREAK)
            return
        self.stack.append(tag)
        depth = len(self.stack)
        if self.keep_at is None and (tag in self.sel.tags or _matches(attrs, self.sel.keep)):
            self.keep_at = depth
        elif (
            self.keep_at is not None
            and self.hide_at is None
            and (tag in _HIDDEN or _matches(attrs, self.sel.drop))
        ):
            self.hide_at = depth
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK and self._shown():
            self.out.append(_BREAK)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/>, <div/>: an element with nothing inside
        if tag in _VOID:
            self.handle_starttag(tag, attrs)
        elif tag in _BLOCK and self._shown():
            self.out.append(_BREAK)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID or tag not in self.stack:
            return  # a stray end tag: ignored, as browsers do
        # close every element left open inside this one (<p> and <li> without end tags)
        while self.stack:
            top = self.stack.pop()
            depth = len(self.stack) + 1
            if top == "pre":
                self.pre -= 1
            if top in _BLOCK and self._shown():
                self.out.append(_BREAK)
            if self.hide_at == depth:
                self.hide_at = None
            if self.keep_at == depth:
                self.keep_at = None
            if top == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._shown():
            self.out.append(data if self.pre else re.sub(r"\s+", " ", data))

    def _shown(self) -> bool:
        return self.keep_at is not None and self.hide_at is None


def html_text(page: str, sel: Selector) -> str:
    """The text of `page`'s kept elements (every one, in page order), paragraphs separated by a
    blank line, lines stripped of trailing spaces. "" when the page has no kept element."""
    p = _Extractor(sel)
    p.feed(page)
    p.close()
    blocks = []
    for block in "".join(p.out).split(_BREAK):
        text = "\n".join(line.rstrip() for line in block.strip("\n").split("\n"))
        if text.strip():
            # a block of prose starts at its first word; a <pre> block keeps its indentation
            blocks.append(text if "\n" in text else text.strip())
    return "\n\n".join(blocks) + "\n" if blocks else ""
