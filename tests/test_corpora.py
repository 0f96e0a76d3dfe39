"""Corpus downloads against a real HTTP server on 127.0.0.1 serving small fixture files: fetch,
cache, resume with Range, a server that ignores Range, checksum mismatch, a dropped connection."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from lmtrain.data.corpora import CorpusFile, cache_dir, corpus_paths, download, listing
from lmtrain.errors import LmtrainError

SHORT = b"First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
TRAIN, VALID, TEST = b"the cat sat <unk>\n" * 40, b"a dog ran\n" * 20, b"the end N\n" * 20


def entry(role: str, path: str, data: bytes) -> CorpusFile:
    return CorpusFile(role, f"https://example.invalid{path}", hashlib.sha256(data).hexdigest(), len(data))


FILES = {"/a/tiny/input.txt": SHORT, "/b/data/ptb.train.txt": TRAIN, "/b/data/ptb.valid.txt": VALID,
         "/b/data/ptb.test.txt": TEST}
CATALOG = {"tiny": (entry("path", "/a/tiny/input.txt", SHORT),),
           "pair": tuple(entry(role, f"/b/data/ptb.{role}.txt", data)
                         for role, data in (("train", TRAIN), ("valid", VALID), ("test", TEST)))}


class Server:
    """Serves FILES; `mode` is "range" (honours Range), "ignore" (always 200) or "drop" (promises the
    whole file, sends half, closes). `requests` records (path, Range header) per request."""

    def __init__(self) -> None:
        self.mode = "range"
        self.files = dict(FILES)
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if server.mode == "range" and self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").removesuffix("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                self.wfile.write(body[:len(body) // 2] if server.mode == "drop" else body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)


@pytest.fixture
def server():
    server = Server()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def fetch(name: str, server: Server, tmp_path: Path, *, progress: bool = False) -> list[Path]:
    return download(name, directory=tmp_path, base_url=server.url, progress=progress, catalog=CATALOG)


def single_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_download_writes_verified_files_under_name(server, tmp_path):
    paths = fetch("pair", server, tmp_path)
    assert paths == [tmp_path / "pair" / f"ptb.{role}.txt" for role in ("train", "valid", "test")]
    assert [path.read_bytes() for path in paths] == [TRAIN, VALID, TEST]
    assert sorted(p.name for p in (tmp_path / "pair").iterdir()) == sorted(p.name for p in paths)  # no .part left
    assert [path for path, _ in server.requests] == ["/b/data/ptb.train.txt", "/b/data/ptb.valid.txt",
                                                     "/b/data/ptb.test.txt"]


def test_download_uses_the_catalog_url_without_base_url(server, tmp_path):
    catalog = {"tiny": (CorpusFile("path", f"{server.url}/a/tiny/input.txt", CATALOG["tiny"][0].sha256,
                                   len(SHORT)),)}
    [path] = download("tiny", directory=tmp_path, progress=False, catalog=catalog)
    assert path.read_bytes() == SHORT


def test_progress_bar_goes_to_stderr(server, tmp_path, capsys):
    fetch("tiny", server, tmp_path, progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "input.txt" in captured.err


def test_second_download_fetches_nothing(server, tmp_path):
    fetch("tiny", server, tmp_path)
    fetch("tiny", server, tmp_path)
    assert len(server.requests) == 1


def test_corrupted_cached_file_is_fetched_again(server, tmp_path):
    [path] = fetch("tiny", server, tmp_path)
    path.write_bytes(SHORT[:-1] + b"?")
    fetch("tiny", server, tmp_path)
    assert path.read_bytes() == SHORT and len(server.requests) == 2


def test_resume_continues_the_part_file_with_range(server, tmp_path):
    (tmp_path / "tiny").mkdir()
    half = len(SHORT) // 2
    (tmp_path / "tiny" / "input.txt.part").write_bytes(SHORT[:half])
    [path] = fetch("tiny", server, tmp_path)
    assert server.requests == [("/a/tiny/input.txt", f"bytes={half}-")]
    assert path.read_bytes() == SHORT and not (tmp_path / "tiny" / "input.txt.part").exists()


def test_server_ignoring_range_starts_over(server, tmp_path):
    server.mode = "ignore"
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "input.txt.part").write_bytes(SHORT[:100])
    [path] = fetch("tiny", server, tmp_path)
    assert server.requests[0][1] == "bytes=100-"
    assert path.read_bytes() == SHORT


def test_checksum_mismatch_deletes_the_part_and_names_both_sums(server, tmp_path):
    bad = b"X" + SHORT[1:]
    server.files["/a/tiny/input.txt"] = bad
    with pytest.raises(LmtrainError) as error:
        fetch("tiny", server, tmp_path)
    message = single_line(error)
    assert "input.txt" in message and CATALOG["tiny"][0].sha256 in message
    assert hashlib.sha256(bad).hexdigest() in message
    assert not (tmp_path / "tiny").exists()  # the part file deleted, and the folder this download made with it


@pytest.mark.parametrize("mode", ["range", "ignore"])
def test_a_file_of_another_size_is_refused_not_resumed_forever(server, tmp_path, mode):
    """A mirror whose file is shorter than the catalog's (another version) is refused with its size, and
    nothing is kept: a kept part would be 'resumed' into the same end at every run."""
    server.mode = mode
    server.files["/a/tiny/input.txt"] = SHORT[:len(SHORT) // 3]
    for _ in range(2):
        with pytest.raises(LmtrainError) as error:
            fetch("tiny", server, tmp_path)
        assert f"holds {len(SHORT) // 3:,} bytes, not the {len(SHORT):,}" in single_line(error)
        assert not (tmp_path / "tiny").exists()
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "input.txt.part").write_bytes(SHORT[:10])  # a part from before, then a Range request
    with pytest.raises(LmtrainError, match="not the"):
        fetch("tiny", server, tmp_path)
    assert not (tmp_path / "tiny" / "input.txt.part").exists()


def test_dropped_connection_keeps_the_part_and_says_resume(server, tmp_path):
    server.mode = "drop"
    with pytest.raises(LmtrainError) as error:
        fetch("tiny", server, tmp_path)
    assert "run the same command again" in single_line(error)
    part = tmp_path / "tiny" / "input.txt.part"
    assert part.read_bytes() == SHORT[:len(SHORT) // 2]
    server.mode = "range"
    [path] = fetch("tiny", server, tmp_path)
    assert path.read_bytes() == SHORT and server.requests[-1][1] == f"bytes={len(SHORT) // 2}-"


def test_missing_file_on_the_server_is_one_line(server, tmp_path):
    del server.files["/a/tiny/input.txt"]
    with pytest.raises(LmtrainError) as error:
        fetch("tiny", server, tmp_path)
    assert "404" in single_line(error)


def test_unreachable_server_is_one_line(tmp_path):
    with pytest.raises(LmtrainError) as error:
        download("tiny", directory=tmp_path, base_url="http://127.0.0.1:9", progress=False, catalog=CATALOG)
    assert "127.0.0.1:9" in single_line(error)


def test_without_network_the_line_names_the_ways_out_and_no_empty_folder_stays(tmp_path):
    cache = tmp_path / "new" / "cache"
    with pytest.raises(LmtrainError) as error:
        download("tiny", directory=cache, base_url="http://127.0.0.1:9", progress=False, catalog=CATALOG)
    assert "--base-url" in single_line(error) and "data.path=" in single_line(error)
    assert not (tmp_path / "new").exists()  # the folders this download made, empty, are gone
    (cache / "tiny").mkdir(parents=True)
    (cache / "tiny" / "notes.txt").write_text("the user's own file")
    with pytest.raises(LmtrainError):
        download("tiny", directory=cache, base_url="http://127.0.0.1:9", progress=False, catalog=CATALOG)
    assert (cache / "tiny" / "notes.txt").exists()  # a folder that was there stays


def test_base_url_must_be_http(tmp_path):
    with pytest.raises(LmtrainError) as error:
        download("tiny", directory=tmp_path, base_url="ftp://mirror", progress=False, catalog=CATALOG)
    assert "--base-url" in single_line(error)


def test_unknown_name_lists_the_known_ones(tmp_path):
    with pytest.raises(LmtrainError) as error:
        download("wikitext", directory=tmp_path, catalog=CATALOG)
    assert "pair, tiny" in single_line(error)
    with pytest.raises(LmtrainError, match="ptb, tinyshakespeare"):
        corpus_paths("wikitext", directory=tmp_path)


def test_cache_dir_follows_lmtrain_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    [path] = download("tiny", base_url=server.url, progress=False, catalog=CATALOG)
    assert path == tmp_path / "cache" / "tiny" / "input.txt"
    assert corpus_paths("tiny", catalog=CATALOG) == {"path": path}
    monkeypatch.delenv("LMTRAIN_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "lmtrain"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lmtrain"  # the XDG rule, as the kernel cache follows it


def test_listing_shows_what_is_cached(server, tmp_path):
    fetch("tiny", server, tmp_path)
    rows = {row["name"]: row for row in listing(directory=tmp_path, catalog=CATALOG)}
    assert rows["tiny"] == {"name": "tiny", "files": ["input.txt"], "cached": True, "other": [],
                            "path": str(tmp_path / "tiny")}
    assert rows["pair"]["cached"] is False and rows["pair"]["other"] == []
    (tmp_path / "pair").mkdir()
    (tmp_path / "pair" / "ptb.valid.txt").write_text("another text")
    row = listing(directory=tmp_path, catalog=CATALOG)[1]
    assert (row["name"], row["cached"], row["other"]) == ("pair", False, ["ptb.valid.txt"])
    assert rows["pair"]["files"] == ["ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"]


def test_corpus_paths_by_role_or_says_how_to_download(server, tmp_path):
    with pytest.raises(LmtrainError) as error:
        corpus_paths("pair", directory=tmp_path, catalog=CATALOG)
    assert "lmtrain data download pair" in single_line(error)
    fetch("pair", server, tmp_path)
    folder = tmp_path / "pair"
    assert corpus_paths("pair", directory=tmp_path, catalog=CATALOG) == {
        "train": folder / "ptb.train.txt", "valid": folder / "ptb.valid.txt", "test": folder / "ptb.test.txt"}


def test_shipped_catalog_matches_the_published_files():
    from lmtrain.data.corpora import CORPORA
    assert {name: [(f.role, f.filename) for f in files] for name, files in CORPORA.items()} == {
        "tinyshakespeare": [("path", "input.txt")],
        "ptb": [("train", "ptb.train.txt"), ("valid", "ptb.valid.txt"), ("test", "ptb.test.txt")]}
    assert all(len(f.sha256) == 64 and f.url.startswith("https://") for files in CORPORA.values() for f in files)


def test_config_names_a_corpus_and_command_line_files_win(tmp_path, monkeypatch):
    from lmtrain.config import load_config
    from lmtrain.data.encoding import load_splits

    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))
    config_file = tmp_path / "c.yaml"
    config_file.write_text("data: {corpus: tinyshakespeare}\ntrain: {max_steps: 1}\n")
    config = load_config(config_file)
    assert config.data.corpus == "tinyshakespeare" and config.data.path is None
    with pytest.raises(LmtrainError, match="lmtrain data download tinyshakespeare"):
        load_splits(config.data)
    cached = tmp_path / "input.txt"  # stands for the downloaded file (the real size is checked above)
    cached.write_text("first line\n" * 9 + "last line\n")
    monkeypatch.setattr("lmtrain.data.encoding.corpus_paths", lambda name: {"path": cached})
    texts = load_splits(config.data)
    assert texts["train"].startswith("first line") and texts["valid"] == "last line\n"
    local = tmp_path / "local.txt"
    local.write_text("a\nb\n")
    overridden = load_config(config_file, [f"data.path={local}"])
    assert overridden.data.corpus is None and overridden.data.path == str(local)


def test_data_list_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from lmtrain.cli import app

    result = CliRunner().invoke(app, ["data", "list", "--dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {row["name"] for row in rows} == {"tinyshakespeare", "ptb"} and not any(row["cached"] for row in rows)
