"""Corpora read from Debian's documentation packages, each large enough for a 10 M-token run
that reads its training split about once (at vocabulary 4096):
- "debdocs": the Linux kernel's documentation and the Python documentation (linux-doc-6.1 and
  python3.11-doc; 10.3 M training tokens);
- "devdocs": the manuals of fifteen other software projects (databases, web and data libraries,
  compilers, an editor: `DEVDOCS_PACKAGES`), from their Sphinx sources where the package ships
  them, else from their HTML pages' main content (trainer.htmltext).

Neither holds a man page or a package description: those stay held apart. Where a manual's
pages are also the source of man pages (PostgreSQL's SQL, program, dblink and SPI reference,
django-admin, ghc, Sphinx's own man/), those pages are left out.

The packages' .deb files are read in place (an ar archive holding data.tar.*); nothing is
installed or unpacked to disk. They are looked for in $ENGRAM_DEBDOCS_DIR, else
~/.cache/engram/debdocs, and fetched there with `apt-get download` when missing (Debian's archive
is the only network this needs). A corpus's documents are the same as those of a folder holding
its text files under one folder per package (`--corpus FOLDER`): same names, same order.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import shutil
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from engram_store.engine.errors import ConfigError
from trainer.htmltext import Selector, html_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DocPackage:
    package: str  # the Debian package
    prefix: str  # the folder its documents are named under, e.g. "linux"
    root: str  # the folder inside the package whose files are read
    suffixes: tuple[str, ...]  # the file names kept (a .gz one is decompressed)
    # glob patterns (fnmatch, "*" crosses "/") on the path under root: a file is read when it
    # matches one of `include` and none of `skip`
    skip: tuple[str, ...] = ()
    include: tuple[str, ...] = ("*",)
    html: Selector | None = None  # HTML pages: the part kept as text (trainer.htmltext)

    def reads(self, rel: str) -> bool:
        return (
            rel.endswith(self.suffixes)
            and any(fnmatchcase(rel, p) for p in self.include)
            and not any(fnmatchcase(rel, p) for p in self.skip)
        )


DEBDOCS_PACKAGES = (
    # the kernel's reStructuredText and plain-text documentation, English only
    DocPackage(
        "linux-doc-6.1",
        "linux",
        "usr/share/doc/linux-doc-6.1/Documentation/",
        (".rst.gz", ".txt.gz"),
        ("translations/*",),
    ),
    # the Python documentation's reStructuredText sources, as Sphinx ships them with the HTML
    DocPackage("python3.11-doc", "python", "usr/share/doc/python3.11/html/_sources/", (".txt",)),
)

# Sphinx sources: the reStructuredText (or Markdown) each page was built from. Left out: the
# autosummary stubs (generated/, api/: one directive a page, no prose) and the rendered example
# scripts (auto_examples/: code).
_SPHINX_SOURCES = (".rst.txt", ".md.txt")
_SPHINX_STUBS = ("*generated/*", "api/*", "*/api/*", "auto_examples/*", "*/auto_examples/*")
# HTML pages that index other pages rather than say anything
_SPHINX_INDEXES = ("_modules/*", "genindex*", "py-modindex.html", "search.html")


def _sphinx(package: str, prefix: str, root: str = "", skip: tuple[str, ...] = ()) -> DocPackage:
    root = root or f"usr/share/doc/{package}/html/_sources/"
    return DocPackage(package, prefix, root, _SPHINX_SOURCES, _SPHINX_STUBS + skip)


DEVDOCS_PACKAGES = (
    DocPackage(
        "python-django-doc",
        "django",
        "usr/share/doc/python-django-doc/html/",
        (".html",),
        _SPHINX_INDEXES + ("ref/django-admin.html",),  # django-admin's page is its man page
        html=Selector(keep=(("class", "yui-g"),), drop=(("class", "headerlink"),)),
    ),
    DocPackage(
        "python-sqlalchemy-doc",
        "sqlalchemy",
        "usr/share/doc/python-sqlalchemy-doc/html/",
        (".html",),
        _SPHINX_INDEXES,
        html=Selector(keep=(("id", "docs-body"),), drop=(("class", "headerlink"),)),
    ),
    DocPackage(
        "postgresql-doc-15",
        "postgresql",
        "usr/share/doc/postgresql-doc-15/html/",
        (".html",),
        # pages also installed as man pages: the SQL commands and programs (postgresql-client's
        # man1 and man7), and the dblink and SPI functions (this package's own man3)
        (
            "sql-*.html",
            "app-*.html",
            "contrib-dblink-*.html",
            "spi-spi-*.html",
            "spi-realloc.html",
            "bookindex.html",
        ),
        html=Selector(
            tags=("body",),
            drop=(("class", "navheader"), ("class", "navfooter"), ("class", "toc")),
        ),
    ),
    DocPackage(
        "sqlite3-doc",
        "sqlite",
        "usr/share/doc/sqlite3/",
        (".html",),
        # generated lists and cross-references; capi3ref.html is c3ref/*.html again on one page
        (
            "requirements.html",
            "doc_*crossref.html",
            "syntaxdiagrams.html",
            "keyword_index.html",
            "sitemap.html",
            "toc.html",
            "docs.html",
            "capi3ref.html",
            "search*",
            "matrix/*",
        ),
        html=Selector(
            tags=("body",),
            drop=(("class", "nosearch"), ("class", "fancy_toc"), ("class", "menu")),
        ),
    ),
    DocPackage(
        "rust-doc",
        "rust",
        "usr/share/doc/rust-doc/html/",
        (".html",),
        # each book's print.html is all of its chapters again; the book's old editions are
        # redirects to the current one
        ("*/print.html", "*/toc.html", "*/404.html", "book/*-edition/*"),
        include=tuple(
            f"{book}/*"
            for book in (
                "book",
                "reference",
                "rust-by-example",
                "nomicon",
                "edition-guide",
                "embedded-book",
                "rustc",
                "rustdoc",
            )
        ),
        html=Selector(tags=("main",)),
    ),
    # ghc.rst is the source of ghc's man page
    _sphinx("ghc-doc", "ghc", "usr/share/doc/ghc-doc/html/users_guide/_sources/", ("ghc.rst.txt",)),
    # vim's :help files; version*.txt are its change logs, lists of patches
    DocPackage("vim-runtime", "vim", "usr/share/vim/vim90/doc/", (".txt",), ("version*.txt",)),
    _sphinx("python-sklearn-doc", "sklearn"),
    _sphinx("python-pandas-doc", "pandas"),
    _sphinx("python-astropy-doc", "astropy"),
    _sphinx("python-dask-doc", "dask"),
    _sphinx("python-xarray-doc", "xarray"),
    _sphinx("python-pytest-doc", "pytest"),
    _sphinx("python-celery-doc", "celery", skip=("reference/*", "internals/reference/*")),
    _sphinx("sphinx-doc", "sphinx", skip=("man/*",)),  # man/: sphinx-build's man pages
)

CORPORA = {"debdocs": DEBDOCS_PACKAGES, "devdocs": DEVDOCS_PACKAGES}


def debdocs_dir() -> Path:
    from trainer.tokenizer import default_cache_dir

    env = os.environ.get("ENGRAM_DEBDOCS_DIR")
    return Path(env) if env else default_cache_dir() / "debdocs"


def find_deb(folder: Path, package: str, fetch: bool = True, corpus: str = "debdocs") -> Path:
    """The package's .deb in `folder` (the newest by name if several), fetched with
    `apt-get download` when there is none and `fetch` is set."""
    found = sorted(folder.glob(f"{package}_*.deb"))
    if not found and fetch and shutil.which("apt-get"):
        folder.mkdir(parents=True, exist_ok=True)
        log.info("corpus %s: apt-get download %s into %s", corpus, package, folder)
        r = subprocess.run(
            ["apt-get", "download", package], cwd=folder, capture_output=True, text=True
        )
        if r.returncode != 0:
            log.warning("apt-get download %s failed: %s", package, r.stderr.strip()[-500:])
        found = sorted(folder.glob(f"{package}_*.deb"))
    if not found:
        raise ConfigError(
            f"corpus {corpus} needs the Debian package {package}: put its .deb in {folder} "
            f"(`cd {folder} && apt-get download {package}`) or set ENGRAM_DEBDOCS_DIR to a folder "
            "that has it"
        )
    return found[-1]


def _ar_member(deb: Path, prefix: str) -> bytes:
    """The data of the first member of the ar archive `deb` whose name starts with `prefix`."""
    with deb.open("rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ConfigError(f"{deb}: not a Debian package (no ar header); fetch it again")
        while True:
            head = f.read(60)
            if len(head) < 60:
                break
            name = head[:16].decode("ascii", "replace").strip().rstrip("/")
            try:
                size = int(head[48:58].decode("ascii").strip())
            except ValueError:
                raise ConfigError(f"{deb}: damaged ar member header; fetch it again") from None
            if name.startswith(prefix):
                data = f.read(size)
                if len(data) != size:
                    raise ConfigError(f"{deb}: truncated ({name}); fetch it again")
                return data
            f.seek(size + (size & 1), os.SEEK_CUR)
    raise ConfigError(f"{deb}: no {prefix}* member; fetch it again")


def package_texts(deb: Path, pkg: DocPackage) -> Iterator[tuple[str, str]]:
    """(name, text) of each kept file of the package, named prefix/path-under-root with a .gz
    dropped and ".txt" added where the name does not end in it, sorted as a folder's paths."""
    data = _ar_member(deb, "data.tar")
    out: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for m in tar:
                path = m.name[2:] if m.name.startswith("./") else m.name
                if not path.startswith(pkg.root) or not (m.isfile() or m.issym()):
                    continue
                rel = path[len(pkg.root) :]
                if not pkg.reads(rel):
                    continue
                try:
                    f = tar.extractfile(m)
                except KeyError:  # a link to a file of another package (Debian links shared files)
                    continue
                if f is None:
                    continue
                raw = f.read()
                if rel.endswith(".gz"):
                    raw, rel = gzip.decompress(raw), rel[: -len(".gz")]
                text = raw.decode("utf-8", errors="replace")
                if pkg.html is not None:
                    text = html_text(text, pkg.html)
                    if not text:
                        continue  # a page with no main content (a redirect, an index frame)
                if not rel.endswith(".txt"):
                    rel += ".txt"
                out[f"{pkg.prefix}/{rel}"] = text
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # gzip: OSError or zlib
        raise ConfigError(f"{deb}: damaged package ({e}); fetch it again") from None
    if not out:
        raise ConfigError(f"{deb}: no {'/'.join(pkg.suffixes)} files under {pkg.root}")
    for name in sorted(out, key=lambda n: PurePosixPath(n)):
        yield name, out[name]


def debdocs_texts(
    folder: Path | None = None, corpus: str = "debdocs", fetch: bool = True
) -> Iterator[tuple[str, str]]:
    """(name, text) of every file of `corpus` (a name in CORPORA), in the order a folder of them
    would be read. Every package is found (or fetched) before any is read."""
    folder = folder or debdocs_dir()
    debs = [(pkg, find_deb(folder, pkg.package, fetch, corpus)) for pkg in CORPORA[corpus]]
    for pkg, deb in sorted(debs, key=lambda pd: pd[0].prefix):
        log.info("corpus %s: %s", corpus, deb.name)
        yield from package_texts(deb, pkg)
