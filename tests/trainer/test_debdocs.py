"""The debdocs and devdocs corpora read from real .deb archives (ar + data.tar.xz, built here as
dpkg-deb lays them out): the documents equal those of a folder holding the same text files."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from engram_store.engine.errors import ConfigError
from trainer import data
from trainer.debdocs import (
    DEBDOCS_PACKAGES,
    DEVDOCS_PACKAGES,
    DocPackage,
    debdocs_texts,
    find_deb,
    package_texts,
)

KDOC = "usr/share/doc/linux-doc-6.1/Documentation/"
PYDOC = "usr/share/doc/python3.11/html/_sources/"


def _tar_xz(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo("./" + name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return buf.getvalue()


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = [b"!<arch>\n"]
    for name, body in members:
        head = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n"
        out += [head.encode("ascii"), body, b"\n" if len(body) % 2 else b""]
    return b"".join(out)


def _deb(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    path.write_bytes(
        _ar(
            [
                ("debian-binary", b"2.0\n"),
                ("control.tar.xz", _tar_xz({"control": b"Package: x\n"})),
                ("data.tar.xz", _tar_xz(files, links)),
            ]
        )
    )
    return path


def _para(topic: str, n: int) -> str:
    return "\n\n".join(
        f"The {topic} driver handles request {i} on the bus. " * 12 for i in range(n)
    )


@pytest.fixture
def debs(tmp_path):
    kernel = {
        KDOC + "PCI/sysfs-pci.rst.gz": gzip.compress(_para("pci", 60).encode()),  # > 16 k chars
        KDOC + "atomic_t.txt.gz": gzip.compress(_para("atomic", 3).encode()),
        KDOC + "PCIe.rst.gz": gzip.compress(_para("pcie", 2).encode()),
        KDOC + "devicetree/bindings/x.yaml.gz": gzip.compress(b"compatible: foo\n"),
        KDOC + "translations/zh_CN/index.rst.gz": gzip.compress("内核文档".encode()),
        "usr/share/doc/linux-doc-6.1/changelog.gz": gzip.compress(b"not under the root"),
    }
    python = {
        PYDOC + "library/os.rst.txt": _para("os module", 4).encode(),
        PYDOC + "howto/logging.rst.txt": _para("logging", 2).encode(),
        "usr/share/doc/python3.11/html/library/os.html": b"<html>left out</html>",
    }
    folder = tmp_path / "debs"
    folder.mkdir()
    _deb(folder / "linux-doc-6.1_6.1.1-1_all.deb", kernel)
    _deb(
        folder / "python3.11-doc_3.11.2-1_all.deb",
        python,
        links={PYDOC + "library/ospath.rst.txt": "os.rst.txt"},
    )
    return folder


def test_debdocs_equals_the_folder_of_its_text_files(debs, tmp_path):
    docs = data.debdocs_documents(debs)
    # the same texts laid out as a folder corpus (the names the module documents)
    tree = tmp_path / "tree"
    expect = {
        "linux/PCI/sysfs-pci.rst.txt": _para("pci", 60),
        "linux/atomic_t.txt": _para("atomic", 3),
        "linux/PCIe.rst.txt": _para("pcie", 2),
        "python/library/os.rst.txt": _para("os module", 4),
        "python/library/ospath.rst.txt": _para("os module", 4),  # a symlink, resolved
        "python/howto/logging.rst.txt": _para("logging", 2),
    }
    for name, text in expect.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    folder_docs = data.load_corpus(tree)
    assert docs == folder_docs
    assert data.corpus_fingerprint(docs) == data.corpus_fingerprint(folder_docs)
    assert {d.origin for d in docs} == set(expect)  # no yaml, no translation, nothing off-root
    assert sum(d.origin == "linux/PCI/sysfs-pci.rst.txt" for d in docs) >= 2  # cut into pieces


def test_package_texts_rejects_a_damaged_package(tmp_path):
    pkg = DEBDOCS_PACKAGES[1]
    bad = tmp_path / "python3.11-doc_1_all.deb"
    bad.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ConfigError, match="not a Debian package"):
        list(package_texts(bad, pkg))
    good = _deb(tmp_path / "ok.deb", {PYDOC + "a.rst.txt": b"text"})
    raw = good.read_bytes()
    bad.write_bytes(raw[: len(raw) - 40])  # the data member cut short
    with pytest.raises(ConfigError, match="truncated|damaged"):
        list(package_texts(bad, pkg))
    gz = gzip.compress(b"a kernel document " * 200)
    broken = _deb(tmp_path / "broken.deb", {KDOC + "a.rst.gz": gz[:12] + b"\xff" * 40 + gz[52:]})
    with pytest.raises(ConfigError, match="damaged package"):  # a member's gzip data corrupted
        list(package_texts(broken, DEBDOCS_PACKAGES[0]))
    empty = _deb(tmp_path / "empty.deb", {"usr/share/doc/other/a.txt": b"text"})
    with pytest.raises(ConfigError, match="no .txt files under"):
        list(package_texts(empty, pkg))


def test_missing_package_names_the_command(tmp_path):
    with pytest.raises(ConfigError, match="apt-get download linux-doc-6.1"):
        find_deb(tmp_path, "linux-doc-6.1", fetch=False)
    (tmp_path / "linux-doc-6.1_6.1.1-1_all.deb").write_bytes(b"x")
    (tmp_path / "linux-doc-6.1_6.1.2-1_all.deb").write_bytes(b"x")
    assert find_deb(tmp_path, "linux-doc-6.1", fetch=False).name == "linux-doc-6.1_6.1.2-1_all.deb"


def test_load_corpus_debdocs_reads_the_folder_in_the_environment(debs, monkeypatch):
    monkeypatch.setenv("ENGRAM_DEBDOCS_DIR", str(debs))
    docs = data.load_corpus("debdocs")
    assert docs == data.debdocs_documents(debs)
    assert docs[0].origin == "linux/PCI/sysfs-pci.rst.txt"  # linux/ before python/, path order


def _page(pkg: DocPackage, body: str) -> bytes:
    """A page the package's selector keeps `body` of, with navigation around it."""
    sel = pkg.html
    assert sel is not None
    if sel.tags:
        main = f"<{sel.tags[0]}>{body}</{sel.tags[0]}>"
    else:
        attr, value = sel.keep[0]
        main = f'<div {attr}="{value}">{body}</div>'
    return f"<html><body><nav>Home | Index</nav>{main}</body></html>".encode()


def _devdocs_debs(folder: Path) -> dict[str, str]:
    """One .deb per devdocs package, each with a page it reads, one it skips and one off its
    root; returns the folder-corpus names and texts expected from them."""
    folder.mkdir()
    expect = {}
    for i, pkg in enumerate(DEVDOCS_PACKAGES):
        prose = _para(f"{pkg.prefix} topic {i}", 2)
        if pkg.html is not None:
            rel, body = "guide/intro.html", _page(pkg, "<p>" + prose.replace("\n\n", "<p>"))
        else:
            rel, body = "guide/intro.rst.txt", prose.encode()
        if pkg.include != ("*",):
            rel = pkg.include[0].replace("*", rel)
        assert pkg.reads(rel)
        skipped = pkg.skip[0].replace("*", "x") if pkg.skip else "guide/notes.yaml"
        assert not pkg.reads(skipped)
        files = {pkg.root + rel: body, pkg.root + skipped: body, "usr/share/doc/x/off.txt": b"no"}
        _deb(folder / f"{pkg.package}_1.0-1_all.deb", files)
        name = f"{pkg.prefix}/{rel}" + ("" if rel.endswith(".txt") else ".txt")
        # an HTML page's paragraphs come out stripped, one blank line apart
        as_html = "\n\n".join(p.strip() for p in prose.split("\n\n")) + "\n"
        expect[name] = as_html if pkg.html is not None else prose
    return expect


def test_devdocs_equals_the_folder_of_its_text_files(tmp_path, monkeypatch):
    expect = _devdocs_debs(tmp_path / "debs")
    monkeypatch.setenv("ENGRAM_DEBDOCS_DIR", str(tmp_path / "debs"))
    docs = data.load_corpus("devdocs")
    tree = tmp_path / "tree"
    for name, text in expect.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    assert docs == data.load_corpus(tree)
    assert {d.origin for d in docs} == set(expect)  # one page a package: no skipped page
    assert "Home" not in "".join(d.text for d in docs)  # HTML pages: their main content only


def test_devdocs_names_the_first_missing_package(tmp_path):
    _devdocs_debs(tmp_path / "debs")
    gone = sorted((tmp_path / "debs").glob("rust-doc_*.deb"))
    gone[0].unlink()
    with pytest.raises(ConfigError, match="corpus devdocs needs the Debian package rust-doc"):
        list(debdocs_texts(tmp_path / "debs", "devdocs", fetch=False))


def test_devdocs_leaves_out_the_sources_of_man_pages():
    by = {pkg.prefix: pkg for pkg in DEVDOCS_PACKAGES}
    # man pages stay held apart: a manual's pages that are also installed as man pages are
    # not read, the rest of the manual is
    left_out = {
        "postgresql": ["sql-select.html", "app-psql.html", "contrib-dblink-close.html"],
        "django": ["ref/django-admin.html"],
        "ghc": ["ghc.rst.txt"],
        "sphinx": ["man/sphinx-build.rst.txt"],
    }
    read = {
        "postgresql": ["tutorial-select.html", "spi-examples.html", "mvcc.html"],
        "django": ["ref/models/querysets.html"],
        "ghc": ["ghci.rst.txt"],
        "sphinx": ["usage/quickstart.rst.txt"],
    }
    for prefix, rels in left_out.items():
        assert not any(by[prefix].reads(r) for r in rels), prefix
    for prefix, rels in read.items():
        assert all(by[prefix].reads(r) for r in rels), prefix
    assert not by["postgresql"].reads("spi-spi-connect.html")
    # Sphinx's autosummary stubs and a book's one-page copy are not read either
    assert not by["pandas"].reads("reference/api/pandas.DataFrame.rst.txt")
    assert not by["sklearn"].reads("modules/generated/sklearn.svm.SVC.rst.txt")
    assert not by["rust"].reads("book/print.html") and by["rust"].reads("book/ch01-00.html")
    assert not by["rust"].reads("core/option/index.html")  # the API docs: not a book


def test_a_link_to_a_file_of_another_package_is_not_read(tmp_path):
    pkg = DEVDOCS_PACKAGES[-1]  # sphinx-doc: Sphinx sources
    deb = _deb(
        tmp_path / "sphinx-doc_1_all.deb",
        {pkg.root + "usage/a.rst.txt": b"a page"},
        links={pkg.root + "usage/b.rst.txt": "../../../../other-doc/b.rst.txt"},
    )
    assert [n for n, _ in package_texts(deb, pkg)] == ["sphinx/usage/a.rst.txt"]
