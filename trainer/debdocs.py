"""The "debdocs" corpus: the Linux kernel's documentation and the Python documentation, read
from the Debian packages that ship them (linux-doc-6.1 and python3.11-doc, about 10 M training
tokens at vocabulary 4096: enough for a 10 M-token run that reads its training split once).

The packages' .deb files are read in place (an ar archive holding data.tar.*); nothing is
installed or unpacked to disk. They are looked for in $ENGRAM_DEBDOCS_DIR, else
~/.cache/engram/debdocs, and fetched there with `apt-get download` when missing (Debian's archive
is the only network this needs). The documents are the same as those of a folder holding the
packages' text files under linux/ and python/ (`--corpus FOLDER`): same names, same order.
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
from pathlib import Path, PurePosixPath

from engram_store.engine.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DocPackage:
    package: str  # the Debian package
    prefix: str  # the folder its documents are named under, e.g. "linux"
    root: str  # the folder inside the package whose files are read
    suffixes: tuple[str, ...]  # the file names kept (a .gz one is decompressed)
    skip: tuple[str, ...] = ()  # sub-folders of root left out


DEBDOCS_PACKAGES = (
    # the kernel's reStructuredText and plain-text documentation, English only
    DocPackage(
        "linux-doc-6.1",
        "linux",
        "usr/share/doc/linux-doc-6.1/Documentation/",
        (".rst.gz", ".txt.gz"),
        ("translations/",),
    ),
    # the Python documentation's reStructuredText sources, as Sphinx ships them with the HTML
    DocPackage("python3.11-doc", "python", "usr/share/doc/python3.11/html/_sources/", (".txt",)),
)


def debdocs_dir() -> Path:
    from trainer.tokenizer import default_cache_dir

    env = os.environ.get("ENGRAM_DEBDOCS_DIR")
    return Path(env) if env else default_cache_dir() / "debdocs"


def find_deb(folder: Path, package: str, fetch: bool = True) -> Path:
    """The package's .deb in `folder` (the newest by name if several), fetched with
    `apt-get download` when there is none and `fetch` is set."""
    found = sorted(folder.glob(f"{package}_*.deb"))
    if not found and fetch and shutil.which("apt-get"):
        folder.mkdir(parents=True, exist_ok=True)
        log.info("corpus debdocs: apt-get download %s into %s", package, folder)
        r = subprocess.run(
            ["apt-get", "download", package], cwd=folder, capture_output=True, text=True
        )
        if r.returncode != 0:
            log.warning("apt-get download %s failed: %s", package, r.stderr.strip()[-500:])
        found = sorted(folder.glob(f"{package}_*.deb"))
    if not found:
        raise ConfigError(
            f"corpus debdocs needs the Debian package {package}: put its .deb in {folder} "
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
                if not rel.endswith(pkg.suffixes) or rel.startswith(pkg.skip):
                    continue
                f = tar.extractfile(m)
                if f is None:
                    continue
                raw = f.read()
                if rel.endswith(".gz"):
                    raw, rel = gzip.decompress(raw), rel[: -len(".gz")]
                if not rel.endswith(".txt"):
                    rel += ".txt"
                out[f"{pkg.prefix}/{rel}"] = raw.decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:  # gzip: OSError or zlib
        raise ConfigError(f"{deb}: damaged package ({e}); fetch it again") from None
    if not out:
        raise ConfigError(f"{deb}: no {'/'.join(pkg.suffixes)} files under {pkg.root}")
    for name in sorted(out, key=lambda n: PurePosixPath(n)):
        yield name, out[name]


def debdocs_texts(
    folder: Path | None = None, packages: tuple[DocPackage, ...] = DEBDOCS_PACKAGES
) -> Iterator[tuple[str, str]]:
    """(name, text) of every file of the corpus, in the order a folder of them would be read."""
    folder = folder or debdocs_dir()
    debs = [(pkg, find_deb(folder, pkg.package)) for pkg in packages]
    for pkg, deb in sorted(debs, key=lambda pd: pd[0].prefix):
        log.info("corpus debdocs: %s", deb.name)
        yield from package_texts(deb, pkg)
