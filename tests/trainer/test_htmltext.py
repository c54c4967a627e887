"""The prose of an HTML documentation page: only the main content, blocks as paragraphs."""

from __future__ import annotations

from trainer.htmltext import Selector, html_text

PAGE = """<!DOCTYPE html>
<html><head><title>Queries | Django</title><style>p { color: red }</style>
<script>var nav = "<p>not text</p>";</script></head>
<body>
<div id="hd"><nav><a href="/">Home</a> | <a href="/topics">Topics</a></nav></div>
<div class="yui-b"><div class="yui-g" id="topics-db-queries">
<h1>Making queries<a class="headerlink" href="#q">¶</a></h1>
<p>Once you have created your
   data models, Django gives you a <em>database-abstraction</em> API &amp; more.
<p>An unclosed paragraph, then a list:
<ul><li>first item<li>second &lt;item&gt;</ul>
<div class="highlight"><pre>
for e in Entry.objects.all():
    print(e.headline)
</pre></div>
<script>track()</script>
<p>Last line<br>after a break.</p>
</div>
<div class="sidebar">Related: <a>Models</a></div>
</div>
</body></html>
"""

DJANGO = Selector(keep=(("class", "yui-g"),), drop=(("class", "headerlink"),))


def test_keeps_the_main_content_as_paragraphs():
    text = html_text(PAGE, DJANGO)
    assert text == (
        "Making queries\n\n"
        "Once you have created your data models, Django gives you a database-abstraction API "
        "& more.\n\n"
        "An unclosed paragraph, then a list:\n\n"
        "first item\n\n"
        "second <item>\n\n"
        "for e in Entry.objects.all():\n"
        "    print(e.headline)\n\n"
        "Last line\nafter a break.\n"
    )


def test_leaves_out_navigation_scripts_styles_and_dropped_elements():
    text = html_text(PAGE, DJANGO)
    for gone in ("Home", "Topics", "not text", "track()", "color", "¶", "Related", "Django\n"):
        assert gone not in text
    # the whole body, with only the sidebar dropped: navigation and scripts still never show
    body = html_text(PAGE, Selector(tags=("body",), drop=(("class", "sidebar"),)))
    assert "Making queries¶" in body and "Home" not in body and "Related" not in body


def test_matches_ids_exactly_and_classes_by_word():
    page = '<div id="docs-body-x">no</div><div id="docs-body">yes</div><p class="a body b">also</p>'
    assert html_text(page, Selector(keep=(("id", "docs-body"),))) == "yes\n"
    assert html_text(page, Selector(keep=(("class", "body"),))) == "also\n"
    assert html_text(page, Selector(keep=(("class", "bod"),))) == ""


def test_every_kept_element_in_page_order_and_stray_end_tags_ignored():
    page = "<main>one</main></div></span><p>outside</p><main><b>two</main>"
    assert html_text(page, Selector(tags=("main",))) == "one\n\ntwo\n"


def test_a_page_without_main_content_is_empty():
    redirect = '<html><head><meta http-equiv="refresh" content="0; url=x.html"></head></html>'
    assert html_text(redirect, Selector(tags=("main",))) == ""
    assert html_text("<main>  \n </main>", Selector(tags=("main",))) == ""
