"""The serving app's plain parts: API key check, config validation, paths, and infra/serve.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fastapi import HTTPException
from pydantic import SecretStr, ValidationError

from cytoloop.config import ServeConfig, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_api_key_check():
    from services.gateway import check_api_key

    check_api_key(None, None)  # no key configured: open
    check_api_key(SecretStr("s3cret"), "s3cret")
    for given, words in [(None, "missing API key"), ("", "missing API key"), ("s3cre", "invalid API key")]:
        with pytest.raises(HTTPException) as caught:
            check_api_key(SecretStr("s3cret"), given)
        assert caught.value.status_code == 401 and words in caught.value.detail
        assert "s3cret" not in caught.value.detail


def test_api_key_is_never_printed():
    config = ServeConfig(api_key="s3cret")
    assert "s3cret" not in repr(config) and "s3cret" not in config.model_dump_json()


def test_batching_limits_are_validated():
    with pytest.raises(ValidationError, match="max_ongoing_requests"):
        ServeConfig(max_batch_size=16, max_ongoing_requests=16)
    with pytest.raises(ValidationError, match="max_replicas"):
        ServeConfig(min_replicas=3, max_replicas=2)


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    from services.app import absolute_paths

    monkeypatch.chdir(tmp_path)
    settings = absolute_paths(load_settings(overrides={"serve": {"model_dir": "m", "prediction_log": "p.jsonl"}}))
    assert settings.registry.tracking_uri == f"sqlite:///{tmp_path}/.cytoloop/mlflow/mlflow.db"
    assert settings.registry.cache_dir == tmp_path / ".cytoloop/models"
    assert settings.serve.model_dir == tmp_path / "m"
    assert settings.serve.prediction_log == tmp_path / "p.jsonl"  # replicas write where `cytoloop drift` reads


def test_serve_yaml_is_a_valid_deploy_config_that_builds(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from services.app import build
    from services.classifier import LiveConfig

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "infra/serve.yaml").read_text()))
    app = config.applications[0]
    assert app.import_path == "services.app:build"
    for key, value in app.runtime_env["env_vars"].items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match="set an API key"):  # the proxy binds 0.0.0.0: no key, no app
        build(app.args)  # a dict, as Ray hands the `args:` block over
    monkeypatch.setenv("CYTOLOOP_SERVE__API_KEY", "a-secret-from-the-cluster-" + "k" * 16)
    built = build(app.args)
    assert type(built).__name__ == "Application"
    with pytest.raises(ValidationError, match="confg"):
        build({"confg": "/etc/settings.json"})  # a misspelt argument is named, not ignored
    # replicas, autoscaling and the live settings sit in the deployments block: changing them is in place
    [classifier] = [d for d in app.deployments if d.name == "Classifier"]
    assert classifier.autoscaling_config and classifier.max_ongoing_requests
    LiveConfig.model_validate(classifier.user_config)


def test_a_request_body_over_the_cap_is_refused_before_it_is_read_whole():
    """The cap used to be max_cells_per_request x max_image_bytes (about 1.7 GB by default)."""
    import asyncio

    from starlette.requests import Request

    from services.uploads import max_body_bytes, read_upload

    config = ServeConfig(max_request_bytes=2_000)
    assert max_body_bytes(ServeConfig()) == 32_000_000  # the default: tens of MB, not gigabytes
    consumed = []

    def request(headers: list[tuple[bytes, bytes]]) -> Request:
        async def receive():
            consumed.append(1)
            return {"type": "http.request", "body": b"x" * 512, "more_body": len(consumed) < 1000}

        scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": headers, "query_string": b""}
        return Request(scope, receive)

    streamed = request([(b"content-type", b"application/json")])
    with pytest.raises(HTTPException) as refused:
        asyncio.run(read_upload(streamed, config))
    assert refused.value.status_code == 413 and "MAX_REQUEST_BYTES" in refused.value.detail
    assert len(consumed) == 4  # 2,048 bytes read of 512,000: refused on the chunk that crossed the cap
    consumed.clear()
    declared = request([(b"content-type", b"application/json"), (b"content-length", b"512000")])
    with pytest.raises(HTTPException) as refused:
        asyncio.run(read_upload(declared, config))
    assert refused.value.status_code == 413 and consumed == []  # its declared length alone refuses it


def test_a_form_field_given_twice_is_refused_naming_it():
    """`site=a` and `site=b` in one multipart request was classified with the last one's model, silently."""
    import asyncio

    import httpx
    from starlette.requests import Request

    from services.uploads import read_upload

    def upload(data: dict[str, str | list[str]]):
        sent = httpx.Request("POST", "http://x/v1/classify", files=[("files", ("a.png", b"x"))], data=data)
        body = sent.read()
        headers = [(k.lower().encode(), v.encode()) for k, v in sent.headers.items()]

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": headers, "query_string": b""}
        return asyncio.run(read_upload(Request(scope, receive), ServeConfig()))

    assert upload({"site": "north"}).site == "north"
    for field, values in (("site", ("north", "south")), ("sample_id", ("s1", "s2"))):
        with pytest.raises(HTTPException) as refused:
            upload({field: list(values)})
        assert refused.value.status_code == 422 and f"form field '{field}' given 2 times" in refused.value.detail
    # an empty field is refused as JSON's "" is (it was no site: the global model answered a lab's cells)
    for field in ("site", "sample_id"):
        with pytest.raises(HTTPException) as refused:
            upload({field: ""})
        assert refused.value.status_code == 422 and field in refused.value.detail


def test_a_json_member_given_twice_is_refused_naming_it():
    """`{"cells": [A, B], "site": "north", "cells": [C], "site": "south"}` was answered for C with south's model, A
    and B dropped without a word: a JSON parser keeps the last of a repeated member."""
    import asyncio
    import json

    from starlette.requests import Request

    from services.uploads import read_upload

    def upload(body: bytes):
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(b"content-type", b"application/json")]
        scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": headers, "query_string": b""}
        return asyncio.run(read_upload(Request(scope, receive), ServeConfig()))

    cell = '{"name": "a.png", "image_b64": "eA=="}'
    assert upload(json.dumps({"site": "north", "cells": [json.loads(cell)]}).encode()).site == "north"
    for body, member in (
        (f'{{"cells": [{cell}], "site": "north", "cells": [{cell}], "site": "south"}}', "cells"),
        ('{"cells": [{"name": "a.png", "image_b64": "eA==", "name": "b.png"}]}', "name"),
    ):
        with pytest.raises(HTTPException) as refused:
            upload(body.encode())
        assert refused.value.status_code == 422 and f"member {member!r} given twice" in refused.value.detail
    for body in (b'{"cells": [', b"[" * 100_000):  # not JSON, or nested past Python's stack: a 422, not a 500
        with pytest.raises(HTTPException) as refused:
            upload(body)
        assert refused.value.status_code == 422 and "invalid request" in refused.value.detail


def test_nothing_a_request_gives_is_dropped_or_a_500(monkeypatch):
    """Found at the boundary: a multipart body cut before its closing boundary was answered without its last part
    (a cell, or the `site` field: then the global model answered); `?site=` in the URL was ignored the same way; a
    charset Python cannot decode with was a 500; a million JSON cells were validated and decoded before the count
    was checked; a 413 named MAX_REQUEST_BYTES when the cell and image limits set the cap."""
    import asyncio
    import base64
    import io
    import json

    import httpx
    from PIL import Image
    from starlette.requests import Request

    from services import uploads
    from services.uploads import read_upload

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")

    def read(body: bytes, content_type: str, query: bytes = b"", config: ServeConfig | None = None):
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(b"content-type", content_type.encode())]
        scope = {"type": "http", "method": "POST", "path": "/v1/classify", "headers": headers, "query_string": query}
        return asyncio.run(read_upload(Request(scope, receive), config or ServeConfig()))

    def refused(*args, **kwargs) -> HTTPException:
        with pytest.raises(HTTPException) as caught:
            read(*args, **kwargs)
        return caught.value

    sent = httpx.Request(
        "POST", "http://x", files=[("files", ("a.png", png.getvalue())), ("files", ("b.png", png.getvalue()))]
    )
    body, content_type = sent.read(), sent.headers["content-type"]
    assert read(body, content_type).n_cells == 2
    cut = body[: body.rindex(b"--" + content_type.split("boundary=")[1].encode() + b"--")]
    error = refused(cut, content_type)  # was: n_cells 1, b.png gone without a word
    assert error.status_code == 400 and "no closing boundary" in error.detail
    error = refused(body, content_type, query=b"site=north")  # was: answered by the global model
    assert error.status_code == 422 and "'site'" in error.detail and "in the body" in error.detail
    error = refused(body, content_type + "; charset=undefined")  # was: a UnicodeError, a 500
    assert error.status_code == 400 and "charset" in error.detail

    checked = []
    monkeypatch.setattr(uploads, "ClassifyRequest", lambda *a, **k: checked.append(1))
    cells = json.dumps({"cells": [{"image_b64": base64.b64encode(png.getvalue()).decode()}] * 2_000}).encode()
    error = refused(cells, "application/json", config=ServeConfig(max_cells_per_request=1_000))
    assert error.status_code == 413 and "2000 in one request" in error.detail and checked == []
    small = ServeConfig(max_cells_per_request=4, max_image_bytes=1_000_000)
    error = refused(b"x" * (uploads.max_body_bytes(small) + 1), "application/json", config=small)
    assert error.status_code == 413 and "MAX_CELLS_PER_REQUEST x CYTOLOOP_SERVE__MAX_IMAGE_BYTES" in error.detail


def test_readyz_logs_an_error_without_a_message_by_its_type():
    """`TimeoutError()` has an empty message: taking its last line raised IndexError inside the handler, and /readyz
    answered 500 instead of 503."""
    from services.gateway import last_line

    assert last_line(TimeoutError()) == "TimeoutError"
    assert last_line(RuntimeError("Traceback ...\n  File x\nValueError: no model\n")) == "ValueError: no model"


def test_the_kuberay_serve_config_is_valid_and_leaves_routing_to_the_settings():
    """serveConfigV2 is a copy of serve.yaml's application that no test read; a `routing:` block in a deployment's
    user_config replaces the settings file's routing whole (an anomaly threshold of null turns the anomaly route
    off), so neither config carries one."""
    from ray.serve.schema import ServeDeploySchema

    from services.classifier import LiveConfig

    manifest = yaml.safe_load((REPO / "infra/kuberay/rayservice.yaml").read_text())
    for config in (
        ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"])),
        ServeDeploySchema.model_validate(yaml.safe_load((REPO / "infra/serve.yaml").read_text())),
    ):
        [app] = config.applications
        assert app.import_path == "services.app:build"
        [classifier] = [d for d in app.deployments if d.name == "Classifier"]
        assert LiveConfig.model_validate(classifier.user_config).routing is None


def test_the_kuberay_clusters_turn_on_ray_token_authentication():
    """A Ray dashboard reachable in the cluster runs code for anyone: both manifests ask KubeRay for a token."""
    service = yaml.safe_load((REPO / "infra/kuberay/rayservice.yaml").read_text())
    job = yaml.safe_load((REPO / "infra/kuberay/rayjob-finetune.yaml").read_text())
    for cluster in (service["spec"]["rayClusterConfig"], job["spec"]["rayClusterSpec"]):
        assert cluster["authOptions"] == {"mode": "token"}
        assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52)  # Ray's token authentication


def test_the_image_installs_what_the_services_and_jobs_import():
    """The image ran `pip install .`: no Ray, MLflow or FastAPI, so no Ray pod could start (`ray start`)."""
    import re
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dockerfile = (REPO / "infra/Dockerfile").read_text().splitlines()
    [line] = [line for line in dockerfile if line.startswith("RUN pip install")]
    named = set(re.search(r'"?\.\[([a-z,]+)\]"?', line).group(1).split(","))
    if "all" in named:
        named |= set(re.findall(r"cytoloop\[([a-z,]+)\]", " ".join(extras["all"]))[0].split(","))
    assert {"serve", "train", "review"} <= named


def test_a_serve_port_another_program_holds_is_refused_naming_it(tmp_path):
    """Ray's HTTP proxy binds with SO_REUSEPORT: a second Serve of the same user on a port another Serve held
    (another home's demo, a `cytoloop serve` left running) started without a word, and the kernel shared the
    connections out between the two, so cells were answered by the other one's models."""
    import socket

    from cytoloop.config import Settings
    from cytoloop.errors import UsageError
    from services.app import start_serve

    with socket.socket() as other:  # as Ray's proxy listens
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        settings = Settings(home=tmp_path, serve={"host": "127.0.0.1", "port": port})
        with pytest.raises(UsageError, match=f"serve.port {port} on 127.0.0.1 is taken by another program"):
            start_serve(settings)
