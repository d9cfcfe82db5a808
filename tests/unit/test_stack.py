"""`cytoloop stack` without starting anything heavy: secrets, status, clear errors."""

from __future__ import annotations

import socket
import stat

import pytest

from cytoloop.config import Settings
from ops.stack import Stack, StackError, stack_secrets


def settings_in(tmp_path, **stack) -> Settings:
    return Settings(home=tmp_path / "home", stack={"images_root": tmp_path, "ray": False, **stack})


def test_secrets_are_generated_once_and_kept_private(tmp_path):
    settings = settings_in(tmp_path)
    first = stack_secrets(settings)
    assert set(first) == {"admin_password", "admin_token", "webhook_secret"}
    assert all(len(v) == 40 for v in first.values())
    assert stack_secrets(settings) == first
    path = tmp_path / "home" / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    given = Settings(home=tmp_path / "home", stack={"admin_token": "t" * 40})
    assert stack_secrets(given)["admin_token"] == "t" * 40
    assert stack_secrets(settings)["admin_token"] == "t" * 40  # what was given is what later processes read


def test_status_of_a_fresh_home(tmp_path):
    status = {s.name: s.state for s in Stack(settings_in(tmp_path)).status()}
    assert status == {"label-studio": "down", "labels": "down", "mlflow": "disabled", "ray": "disabled"}


def test_a_taken_port_is_named_before_anything_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = Settings(home=tmp_path / "home", review={"webhook_port": port}, stack={"ray": False})
        with pytest.raises(StackError, match=f"labels: port {port} on 127.0.0.1 is taken"):
            Stack(settings).up(only=["labels"])
    assert Stack(settings).down() == []


def test_ray_temp_folder_must_stay_short(tmp_path):
    settings = Settings(home=tmp_path / ("x" * 80), stack={"ray": True})
    with pytest.raises(StackError, match="107"):
        Stack(settings).services()
