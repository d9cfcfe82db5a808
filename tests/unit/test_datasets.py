"""Public datasets without the internet: a tiny archive in BloodMNIST's layout (random pixels, not cells) served
from 127.0.0.1, fetched, verified and converted; checksum and network failures; where commands find their data."""

from __future__ import annotations

import csv
import hashlib
import io
import socket
import threading
from collections import Counter
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from typer.testing import CliRunner

from cytoloop.data import datasets
from cytoloop.data.datasets import DownloadError, NoDataError, fetch, fetched, resolve_data
from cytoloop.data.records import load_records
from ops.cli import app

SPLIT_SIZES = {"train": 24, "val": 8, "test": 8}  # labels cycle through the 8 classes: 5 cells per class


def _archive() -> tuple[bytes, dict[str, int]]:
    """A MedMNIST-layout .npz of random 28x28 RGB arrays, and the number of cells per CytoLoop class in it."""
    rng = np.random.default_rng(0)
    arrays, counts = {}, Counter()
    for split, n in SPLIT_SIZES.items():
        labels = np.arange(n).reshape(n, 1) % 8
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels
        counts.update(datasets.BLOODMNIST_CLASSES[i] for i in labels.ravel())
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue(), dict(counts)


class _Server:
    """Serves one payload at every path, honouring `Range: bytes=N-` like Zenodo, and records the requests."""

    def __init__(self, payload: bytes):
        self.payload, self.ranges = payload, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                wanted = self.headers.get("Range")
                server.ranges.append(wanted)
                start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted else 0
                if start >= len(server.payload):
                    self.send_response(416)
                    self.end_headers()
                    return
                body = server.payload[start:]
                self.send_response(206 if wanted else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/tiny.npz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """httpx honours proxy variables; 127.0.0.1 must be reached directly."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def archive():
    return _archive()


@pytest.fixture
def server(archive):
    served = _Server(archive[0])
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


@pytest.fixture
def catalogue(server, archive):
    """A catalogue whose one downloadable entry is the BloodMNIST entry pointed at the local server."""
    entry = replace(
        datasets.CATALOGUE["bloodmnist"], name="tiny", url=server.url, md5=hashlib.md5(archive[0]).hexdigest()
    )
    return {"tiny": entry, "pbc": datasets.CATALOGUE["pbc"]}


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/tiny.npz"  # nothing listens there any more: connection refused


def test_fetch_converts_to_a_manifest_with_the_right_labels(tmp_path, catalogue, archive):
    folder = fetch("tiny", tmp_path, progress=False, catalogue=catalogue)

    assert folder == tmp_path / "tiny" and fetched("tiny", tmp_path, catalogue) == folder
    records = load_records(folder)
    assert Counter(r.label for r in records) == archive[1]
    assert {r.domain for r in records} == {"bloodmnist"}
    assert all(r.path.is_file() and r.path.parent.name == r.label for r in records)
    with (folder / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label", "domain", "source", "license"]
    assert {row["license"] for row in rows} == {"CC BY 4.0"} and "BloodMNIST" in rows[0]["source"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # archive and partial folders are gone


def test_second_fetch_downloads_nothing(tmp_path, catalogue, server):
    first = fetch("tiny", tmp_path, progress=False, catalogue=catalogue)
    assert fetch("tiny", tmp_path, progress=False, catalogue=catalogue) == first
    assert len(server.ranges) == 1


def test_a_completion_marker_cut_short_means_fetch_again(tmp_path, catalogue, server):
    """A marker cut short (a full disk) raised JSONDecodeError from every command that looks for the dataset."""
    from cytoloop.data.datasets import MARKER

    folder = fetch("tiny", tmp_path, progress=False, catalogue=catalogue)
    (folder / MARKER).write_text('{"md5": "')
    assert fetched("tiny", tmp_path, catalogue) is None
    assert fetch("tiny", tmp_path, progress=False, catalogue=catalogue) == folder and len(server.ranges) == 2


def test_interrupted_download_resumes(tmp_path, catalogue, server, archive):
    half = len(archive[0]) // 2
    (tmp_path / "tiny.npz.part").write_bytes(archive[0][:half])

    folder = fetch("tiny", tmp_path, progress=False, catalogue=catalogue)

    assert server.ranges == [f"bytes={half}-"]
    assert Counter(r.label for r in load_records(folder)) == archive[1]


def test_wrong_checksum_is_a_clear_error_and_leaves_nothing(tmp_path, catalogue, archive):
    bad = {"tiny": replace(catalogue["tiny"], md5="0" * 32)}

    with pytest.raises(DownloadError) as error:
        fetch("tiny", tmp_path, progress=False, catalogue=bad)

    message = str(error.value)
    assert "0" * 32 in message and hashlib.md5(archive[0]).hexdigest() in message and "removed" in message
    assert list(tmp_path.iterdir()) == []
    assert fetched("tiny", tmp_path, bad) is None


def test_unreachable_network_says_how_to_use_local_images(tmp_path, catalogue):
    offline = {"tiny": replace(catalogue["tiny"], url=_closed_port_url())}

    with pytest.raises(DownloadError) as error:
        fetch("tiny", tmp_path, progress=False, catalogue=offline)

    message = str(error.value)
    assert "network is unreachable" in message
    assert "--data PATH" in message and "manifest CSV" in message and "sub-folder per class" in message
    assert "CYTOLOOP_DATASETS__ROOT" in message and "\n" not in message


def test_manual_dataset_is_never_downloaded(tmp_path, catalogue):
    with pytest.raises(datasets.DatasetError, match="data.mendeley.com"):
        fetch("pbc", tmp_path, progress=False, catalogue=catalogue)


def test_resolve_data_priority(tmp_path, catalogue):
    given, configured, cache = tmp_path / "given.csv", tmp_path / "configured", tmp_path / "cache"
    given.write_text("path,label,domain\n")
    configured.mkdir()
    downloaded = fetch("tiny", cache, progress=False, catalogue=catalogue)

    assert resolve_data(given, configured, cache, catalogue) == given
    assert resolve_data(None, configured, cache, catalogue) == configured
    assert resolve_data(None, None, cache, catalogue) == downloaded
    assert resolve_data(None, tmp_path / "moved", cache, catalogue) == downloaded  # a stale config falls through
    with pytest.raises(NoDataError, match="missing.csv does not exist"):  # a typo on the command line never does
        resolve_data(tmp_path / "missing.csv", configured, cache, catalogue)


def test_resolve_data_without_any_data_names_the_places_looked_at(tmp_path, catalogue):
    with pytest.raises(NoDataError) as error:
        resolve_data(None, tmp_path / "moved", tmp_path / "cache", catalogue)

    message = str(error.value)
    assert "no cell images found" in message and "\n" not in message
    assert "--data (not given)" in message and f"{tmp_path / 'moved'} (does not exist)" in message
    assert str(tmp_path / "cache") in message
    assert "--data PATH" in message and "CYTOLOOP_DATASETS__ROOT" in message
    assert "cytoloop data fetch tiny" in message


def test_cli_unknown_dataset_lists_the_known_ones(tmp_path):
    result = CliRunner().invoke(app, ["data", "fetch", "bloodmnits", "--dest", str(tmp_path)])

    assert result.exit_code != 0
    assert "unknown dataset 'bloodmnits'" in result.stderr
    assert all(name in result.stderr for name in datasets.CATALOGUE)


def test_cli_fetch_and_list(tmp_path, catalogue, monkeypatch):
    monkeypatch.setitem(datasets.CATALOGUE, "tiny", catalogue["tiny"])

    result = CliRunner().invoke(app, ["data", "fetch", "tiny", "--dest", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"tiny: 40 cells in {tmp_path / 'tiny'}" in result.stdout and "immature_granulocyte" in result.stdout

    listing = CliRunner().invoke(app, ["data", "list", "--dest", str(tmp_path)])
    assert listing.exit_code == 0, listing.output
    assert f"fetched: {tmp_path / 'tiny'}" in listing.stdout
    assert "bloodmnist " in listing.stdout and "not fetched" in listing.stdout and "manual download" in listing.stdout
