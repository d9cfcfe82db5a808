"""`cytoloop stack` without starting anything heavy: secrets, status, clear errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest
from pydantic import SecretStr

from cytoloop.config import Settings
from ops.stack import Stack, StackError, stack_secrets


def settings_in(tmp_path, **stack) -> Settings:
    (tmp_path / "images").mkdir(exist_ok=True)
    return Settings(home=tmp_path / "home", stack={"images_root": tmp_path / "images", "ray": False, **stack})


def test_a_home_inside_the_images_root_is_refused_before_anything_starts(tmp_path):
    """Label Studio serves every file under the images root's parent to any logged-in user (each may add a storage
    on any folder there): CytoLoop's secrets, label store and registry must not be among them."""
    settings = Settings(home=tmp_path / "cells" / ".cytoloop", stack={"images_root": tmp_path / "cells", "ray": False})
    with pytest.raises(StackError, match=r"home .* lies inside .*, the parent of stack.images_root"):
        Stack(settings).up(only=["label-studio"])
    assert not (tmp_path / "cells" / ".cytoloop" / "secrets.json").exists()  # nothing written there either
    # beside the images (`/data/cells` and `/data/cytoloop`, the layout the deploy docs suggested): Label Studio
    # serves from the images folder's parent, where any account may add a storage on the home
    beside = settings.model_copy(update={"home": tmp_path / "cytoloop"})
    with pytest.raises(StackError, match=r"home .* lies inside .*, the parent of stack.images_root"):
        Stack(beside).up(only=["label-studio"])
    deeper = {"images_root": tmp_path / "data" / "cells", "ray": False}  # the served folder: tmp_path/data
    database = {"tracking_uri": f"sqlite:///{tmp_path}/data/m.db"}
    elsewhere = Settings(home=tmp_path / "home", stack=deeper, registry=database)
    with pytest.raises(StackError, match="the MLflow database .* lies inside"):
        Stack(elsewhere).up(only=["label-studio"])


def test_secrets_are_generated_once_and_kept_private(tmp_path):
    settings = settings_in(tmp_path)
    first = stack_secrets(settings)
    assert set(first) == {
        "admin_password",
        "admin_token",
        "webhook_secret",
        "ml_backend_password",
        "ray_token",
        "mlflow_admin_password",
        "mlflow_secret_key",
    }
    assert all(len(v) == 40 for v in first.values())
    assert stack_secrets(settings) == first
    path = tmp_path / "home" / "secrets.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    given = Settings(home=tmp_path / "home", stack={"admin_token": "t" * 40})
    assert stack_secrets(given)["admin_token"] == "t" * 40
    assert stack_secrets(settings)["admin_token"] == "t" * 40  # what was given is what later processes read
    path.chmod(0o644)  # restored from a backup, copied: readable by every user of the host
    assert stack_secrets(settings)["admin_token"] == "t" * 40 and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_damaged_secrets_file_is_named_and_kept(tmp_path):
    """A hand-edited secrets.json ended any command with a JSONDecodeError (or AttributeError) traceback."""
    settings = settings_in(tmp_path)
    path = tmp_path / "home" / "secrets.json"
    path.parent.mkdir(parents=True)
    for damaged in ('{"admin_token": "abc",', '["not", "an", "object"]'):
        path.write_text(damaged)
        with pytest.raises(StackError, match="secrets.json is not a secrets file"):
            stack_secrets(settings)
        assert path.read_text() == damaged  # not replaced by new secrets: the old ones may be needed


def test_an_admin_token_given_after_label_studio_made_its_admin_is_refused_and_the_stored_one_kept(tmp_path):
    """Label Studio takes the admin's token and password only when it makes the admin: one given later (even to
    `stack status`) replaced the stored one, and every later call was refused, the working token gone. A token of 5
    characters or fewer, which Label Studio ignores, is refused by the settings."""
    from pydantic import ValidationError

    settings = settings_in(tmp_path)
    first = stack_secrets(settings)
    database = tmp_path / "home" / "label-studio" / "data" / "label_studio.sqlite3"
    database.parent.mkdir(parents=True)
    database.write_bytes(b"")  # this home's Label Studio has made its admin
    given = settings.model_copy(
        update={"stack": settings.stack.model_copy(update={"admin_token": SecretStr("n" * 40)})}
    )
    with pytest.raises(StackError, match="stack.admin_token differs .* CYTOLOOP_STACK__ADMIN_TOKEN"):
        Stack(given).status()
    assert stack_secrets(settings) == first  # the working token is kept
    same = settings.model_copy(
        update={"stack": settings.stack.model_copy(update={"admin_token": SecretStr(first["admin_token"])})}
    )
    assert stack_secrets(same) == first
    with pytest.raises(ValidationError, match="admin_token"):
        Settings(stack={"admin_token": "short"})
    # the same home pointed at another (remote) Label Studio takes that one's token: the local admin is not it
    remote = given.model_copy(
        update={"review": given.review.model_copy(update={"label_studio_url": "http://labelstudio.lab:8080"})}
    )
    assert stack_secrets(remote)["admin_token"] == "n" * 40


def test_status_of_a_fresh_home(tmp_path, clean_env):
    from typer.testing import CliRunner

    from ops.cli import app

    status = {s.name: s.state for s in Stack(settings_in(tmp_path)).status()}
    assert status == {"label-studio": "down", "labels": "down", "mlflow": "disabled", "ray": "disabled"}
    clean_env.setenv("CYTOLOOP_HOME", str(tmp_path / "home"))
    clean_env.setenv("CYTOLOOP_STACK__RAY", "false")
    shown = CliRunner().invoke(app, ["stack", "status"])  # a monitor's check: it exited 0 with everything down
    assert shown.exit_code == 8 and "label-studio  down" in shown.output, shown.output


def test_a_taken_port_is_named_before_anything_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = Settings(home=tmp_path / "home", review={"webhook_port": port}, stack={"ray": False})
        with pytest.raises(StackError, match=f"labels: port {port} on 127.0.0.1 is taken"):
            Stack(settings).up(only=["labels"])
    assert Stack(settings).down() == []


def test_ray_s_dashboard_port_taken_by_another_program_is_named_before_ray_starts(tmp_path):
    """Another program on the dashboard port (a notebook's own `ray.init()`) answered the health check in the head's
    place: `up` said "ray: up" and exited 0 while our head died on the taken port."""
    with socket.socket() as busy, socket.socket() as free:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        free.bind(("127.0.0.1", 0))
        port, gcs = busy.getsockname()[1], free.getsockname()[1]
        free.close()
        home = Path(tempfile.mkdtemp(prefix="cyd-"))  # short: Ray's socket paths
        settings = Settings(home=home, stack={"ray": True, "ray_port": gcs, "ray_dashboard_port": port})
        try:
            with pytest.raises(StackError, match=f"ray: port {port} on 127.0.0.1 is taken"):
                Stack(settings).up(only=["ray"])
            assert Stack(settings).down() == []
        finally:
            shutil.rmtree(home, ignore_errors=True)


def test_ray_temp_folder_must_stay_short(tmp_path):
    settings = Settings(home=tmp_path / ("x" * 80), stack={"ray": True})
    with pytest.raises(StackError, match="107"):
        Stack(settings).services()


def test_down_during_an_up_stops_what_the_up_started(tmp_path, monkeypatch):
    """`down` while `up` has started a service but not yet written its PID file: `down` found nothing to stop,
    removed no file, and returned, and the service then ran on. `down` now waits for the `up` and stops it. The
    window (microseconds) is held open by the identity read that comes between the start and the file: it goes on
    only once `down` has asked the `up` to stop (its request beside the lock) or has returned."""
    import threading
    import time

    import ops.stack as stack_module

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(home=tmp_path / "home", review={"webhook_port": port}, stack={"ray": False})
    real_identity, started, returned = stack_module._identity, threading.Event(), threading.Event()
    run_dir = Stack(settings).run_dir

    def slow_identity(pid: int) -> str | None:
        started.set()  # the first call: `up` has just started the process
        deadline = time.monotonic() + 30
        while not (list(run_dir.glob("down.*.requested")) or returned.is_set()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return real_identity(pid)

    monkeypatch.setattr(stack_module, "_identity", slow_identity)
    errors: list[BaseException] = []

    def up() -> None:
        try:
            Stack(settings).up(only=["labels"])
        except BaseException as error:
            errors.append(error)

    racer = threading.Thread(target=up)
    racer.start()
    try:
        assert started.wait(60), "up never started the receiver"
        stopped = Stack(settings).down()
        returned.set()
        assert stopped == ["labels"]
        racer.join(timeout=120)
        assert not racer.is_alive()
        # the `up` finished, or stopped at the receiver's health check for the `down` waiting: both are right
        assert errors == [] or "`cytoloop stack down` was asked for meanwhile" in str(errors[0]), errors
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "the receiver outlived `down`"
    finally:
        racer.join(timeout=120)
        Stack(settings).down()


def test_down_stops_an_up_waiting_for_a_service_that_never_becomes_healthy(tmp_path, monkeypatch):
    """An `up` waits up to `stack.start_timeout_s` for each service's health check; a `down` meanwhile (the
    operator giving up on a hung start) used to wait all that time. The `up` now stops at once, with an error
    that says why, and `down` stops what it had started."""
    import threading

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(
        home=tmp_path / "home", review={"webhook_port": port}, stack={"ray": False, "start_timeout_s": 600}
    )
    started = threading.Event()

    def never_healthy(self, service) -> bool:
        started.set()
        return False

    monkeypatch.setattr(Stack, "_healthy", never_healthy)
    up_errors: list[BaseException] = []
    stopped: list[list[str]] = []

    def up() -> None:
        try:
            Stack(settings).up(only=["labels"])
        except BaseException as error:
            up_errors.append(error)

    racer, downer = threading.Thread(target=up), threading.Thread(target=lambda: stopped.append(Stack(settings).down()))
    racer.start()
    try:
        assert started.wait(60), "up never started the receiver"
        downer.start()
        downer.join(timeout=60)
        racer.join(timeout=60)
        assert not downer.is_alive() and not racer.is_alive(), "down waited for the hung up"
        assert stopped == [["labels"]]
        [error] = up_errors
        assert isinstance(error, StackError) and "stack down" in str(error)
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, "the receiver outlived `down`"
        assert not list(Stack(settings).run_dir.glob("down.*.requested"))
    finally:
        monkeypatch.undo()  # a hung up (without the fix) then finishes, and is stopped
        racer.join(timeout=120)
        if downer.is_alive():
            downer.join(timeout=120)
        Stack(settings).down()


def test_a_down_that_is_gone_or_stops_other_services_stops_no_up(tmp_path):
    """A `down` killed while it waited left its request to stop behind; the next `up` must start all the same. A
    `down --only` of other services stops no `up` of this one."""
    import subprocess

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(home=tmp_path / "home", review={"webhook_port": port}, stack={"ray": False})
    gone = subprocess.Popen(["true"])
    gone.wait()
    stack = Stack(settings)
    stack.run_dir.mkdir(parents=True)
    left = stack.run_dir / f"down.{gone.pid}.0.requested"
    left.write_text(f'{{"pid": {gone.pid}, "only": null}}')
    try:
        [labels] = [s for s in stack.up(only=["labels"]) if s.name == "labels"]
        assert labels.state == "up" and not left.exists()
        stack.down()
        # a live `down --only mlflow` waiting (this very process stands in for it) stops no `up` of the receiver
        other = stack._ask_up_to_stop(["mlflow"])
        [labels] = [s for s in stack.up(only=["labels"]) if s.name == "labels"]
        assert labels.state == "up" and other.exists()
        stack.down()
        stack._ask_up_to_stop(["labels"])
        with pytest.raises(StackError, match="stack down` was asked for meanwhile"):  # one that stops it does
            stack.up(only=["labels"])
    finally:
        for request in stack.run_dir.glob("down.*.requested"):
            request.unlink()
        stack.down()


def test_a_down_that_ends_leaves_another_waiting_down_s_request(tmp_path):
    """Two `down`s waiting for one `up` shared one request file, and the first to finish removed it: an `up`
    starting before the second `down` took the lock started every service it asked for, and that `down` waited
    for all of it. Each `down` now takes back only its own request."""
    import fcntl
    import threading
    import time

    stack = Stack(Settings(home=tmp_path / "home", stack={"ray": False}))
    stack.run_dir.mkdir(parents=True)
    other = stack._ask_up_to_stop(None)  # a `down` still waiting (this very process stands in for it)
    with open(stack.run_dir / "up.lock", "w") as held:  # an `up` in progress
        fcntl.flock(held, fcntl.LOCK_EX)
        downer = threading.Thread(target=stack.down)
        downer.start()
        deadline = time.monotonic() + 30
        while len(list(stack.run_dir.glob("down.*.requested"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(list(stack.run_dir.glob("down.*.requested"))) == 2, "the down asked for nothing"
        fcntl.flock(held, fcntl.LOCK_UN)
    downer.join(timeout=60)
    assert not downer.is_alive()
    assert list(stack.run_dir.glob("down.*.requested")) == [other] and stack._down_waiting("labels")
    other.unlink()
    assert not stack._down_waiting()


def test_stack_down_never_signals_a_process_that_is_not_the_one_it_started(tmp_path):
    """After a reboot (or PID reuse) a PID file names a stranger: `stack down` used to kill its process group."""
    import json
    import subprocess

    from ops.stack import _identity

    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    identity = _identity(stranger.pid)  # recorded now; checked below to be the same later and this process's only
    try:
        settings = settings_in(tmp_path)
        stack = Stack(settings)
        stack.run_dir.mkdir(parents=True)
        pid_file = stack.run_dir / "labels.pid"
        # the PID it had then is the stranger's PID now, but the process that had it started at another time
        pid_file.write_text(json.dumps({"pid": stranger.pid, "identity": "another-boot:12345", "port": 1}))
        assert {s.name: s.state for s in stack.status()}["labels"] == "stale"
        assert stack.down() == []
        assert stranger.poll() is None  # still running: never signalled
        assert not pid_file.exists()  # the stale file is gone
        pid_file.write_text(json.dumps({"pid": stranger.pid, "port": 1}))  # a file of old: no identity to check
        assert stack.down() == [] and stranger.poll() is None
        assert identity is not None and _identity(stranger.pid) == identity != _identity(os.getpid())
    finally:
        stranger.kill()
        stranger.wait()


def test_down_stops_what_is_left_of_a_group_whose_first_process_was_killed(tmp_path):
    """MLflow's first process killed (out of memory, `kill -9`), its workers running on in its group: `down` said
    "nothing was running" and dropped the PID file, and the workers kept the port with no command left to stop
    them. The group, this boot's and the one this home started, is stopped now, and `up` says so and keeps the
    PID file."""
    import json
    import subprocess

    from ops.stack import _identity

    # a group whose first process ends at once and leaves a worker: the worker's PID is written to stdout
    group = subprocess.Popen(
        ["bash", "-c", "sleep 300 & echo $!"], start_new_session=True, stdout=subprocess.PIPE, text=True
    )
    worker = int(group.stdout.readline())
    group.wait()  # the first process is gone (reaped); its worker runs on in the group
    try:
        stack = Stack(settings_in(tmp_path))
        stack.run_dir.mkdir(parents=True)
        boot = _identity(os.getpid()).split(":")[0]
        recorded = {"pid": group.pid, "identity": f"{boot}:12345", "port": 5000}
        (stack.run_dir / "mlflow.pid").write_text(json.dumps(recorded))
        # `up` dropped the PID file and blamed "another process" for the port: `down` could then stop nothing
        with pytest.raises(StackError, match=rf"mlflow's first process \(pid {group.pid}\) has died, but the rest"):
            Stack(settings_in(tmp_path, mlflow_server=True)).up(only=["mlflow"])
        assert stack.down(timeout_s=5) == ["mlflow"]
        assert not Path(f"/proc/{worker}").exists()
        # another boot's record of that group id: never signalled
        survivor = subprocess.Popen(
            ["bash", "-c", "sleep 300 & echo $!"], start_new_session=True, stdout=subprocess.PIPE, text=True
        )
        worker = int(survivor.stdout.readline())
        survivor.wait()
        recorded = {"pid": survivor.pid, "identity": "another-boot:12345", "port": 5000}
        (stack.run_dir / "mlflow.pid").write_text(json.dumps(recorded))
        assert stack.down(timeout_s=5) == [] and Path(f"/proc/{worker}").exists()
    finally:
        for pid in (worker,):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def test_processes_starting_at_once_share_one_set_of_secrets(tmp_path):
    """Four processes read the secrets of a fresh home at the same moment: each used to generate its own, and all
    but the last writer's went on with secrets no other process knew."""
    import subprocess
    import sys

    go = tmp_path / "go"
    script = (
        "import sys, time, pathlib\n"
        "from cytoloop.config import Settings\n"
        "from ops.stack import stack_secrets\n"
        "print('ready', flush=True)\n"
        "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.001)\n"
        "print(stack_secrets(Settings(home=sys.argv[2]))['webhook_secret'])\n"
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(go), str(tmp_path / "home")], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]

    for child in children:  # every child imported and waits at the line (a fixed sleep let a slow one miss it)
        assert child.stdout.readline().strip() == "ready"
    go.touch()
    seen = {child.communicate(timeout=60)[0].strip() for child in children}
    assert len(seen) == 1 and seen == {stack_secrets(settings_in(tmp_path))["webhook_secret"]}


def test_ray_stays_on_loopback_when_the_other_services_face_the_network(tmp_path):
    """Label Studio on all interfaces (for remote annotators) used to put Ray's head and Jobs API there too, with
    authentication off: anyone on the network could run code. Ray now keeps to `stack.ray_host` (loopback)."""
    (tmp_path / "images").mkdir()
    home = Path(tempfile.mkdtemp(prefix="cyr-"))  # short: Ray's socket paths
    settings = Settings(home=home, stack={"images_root": tmp_path / "images", "host": "0.0.0.0", "ray": True})
    [ray] = [s for s in Stack(settings).services() if s.name == "ray"]
    shutil.rmtree(home)
    assert ray.command[ray.command.index("--node-ip-address") + 1] == "127.0.0.1"
    assert ray.command[ray.command.index("--dashboard-host") + 1] == "127.0.0.1"
    assert ray.env["RAY_AUTH_MODE"] == "disabled"


def test_a_folder_named_as_the_label_studio_venv_is_never_deleted(tmp_path):
    """The venv is built aside and renamed into place; the rename used to rmtree whatever stood there (the
    user's own venv, a folder of several, the project's .venv) before a single check."""
    from ops.stack import ensure_label_studio_venv

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    settings = Settings(home=tmp_path / "home", stack={"label_studio_venv": folder})
    with pytest.raises(StackError, match="exists but is neither a Label Studio venv nor one cytoloop made"):
        ensure_label_studio_venv(settings)
    assert (folder / "notes.txt").read_text() == "keep me"
    own = tmp_path / "own-venv"  # a Label Studio venv the user made: used as it is, nothing installed
    (own / "bin").mkdir(parents=True)
    for name in ("python", "label-studio"):
        (own / "bin" / name).write_text("")
    assert ensure_label_studio_venv(Settings(home=tmp_path / "home", stack={"label_studio_venv": own})) == (
        own / "bin" / "python"
    )


def test_only_names_services_of_this_stack(tmp_path):
    """`--only labelstudio` (a typo) started nothing and exited 0; `down --only labelstudio` said nothing was
    running while Label Studio went on; `--only mlflow` with the MLflow server turned off did nothing."""
    stack = Stack(Settings(home=tmp_path / "home", stack={"mlflow_server": False, "ray": False}))
    with pytest.raises(StackError, match="no service labelstudio in this stack; its services: label-studio, labels"):
        stack.up(only=["labelstudio"])
    with pytest.raises(StackError, match="no service mlflow in this stack"):
        stack.up(only=["mlflow"])
    with pytest.raises(StackError, match="no service labelstudio in this stack"):
        stack.down(only=["labelstudio"])
    assert stack.down(only=["mlflow"]) == []  # stopping what the settings turned off is fine: nothing runs


def test_the_port_is_probed_on_the_address_the_service_binds(tmp_path):
    """The label receiver binds review.webhook_host: a process already there used to go unseen (the probe looked
    at stack.host), and `up` reported the receiver up on the strength of the other process's port."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.2", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = Settings(
            home=tmp_path / "home", review={"webhook_port": port, "webhook_host": "127.0.0.2"}, stack={"ray": False}
        )
        with pytest.raises(StackError, match=f"labels: port {port} on 127.0.0.2 is taken"):
            Stack(settings).up(only=["labels"])


def test_two_ups_at_once_start_one_receiver_that_down_stops(tmp_path):
    """Two `up`s on one home at the same moment both saw no PID and a free port and both started the service;
    one lost the port, and the PID file could name it while the other ran on, beyond `down`'s reach."""
    import threading

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings(home=tmp_path / "home", review={"webhook_port": port}, stack={"ray": False})
    barrier, errors = threading.Barrier(2), []

    def up() -> None:
        barrier.wait()
        try:
            Stack(settings).up(only=["labels"])
        except BaseException as error:  # any failure of a racer, not only the stack's own errors
            errors.append(error)

    threads = [threading.Thread(target=up) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == [] and not any(thread.is_alive() for thread in threads)
        [labels] = [s for s in Stack(settings).status() if s.name == "labels"]
        assert labels.state == "up"
    finally:
        Stack(settings).down()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "a receiver outlived `down`"


def test_the_label_receiver_s_settings_file_holds_no_secret_not_even_masked(tmp_path):
    """A secret given in the settings reached the receiver's settings file as its mask, '**********' (the new ML
    backend password was missing from a hand-kept list), and the receiver then stored the mask in secrets.json as
    the password. Every secret field is left out of that file now."""
    settings = Settings(
        home=tmp_path / "home",
        stack={"admin_password": "p" * 12, "admin_token": "t" * 40, "ray": False},
        review={"webhook_secret": "w" * 20, "ml_backend_password": "m" * 20},
        serve={"api_key": "k" * 20},
    )
    stack = Stack(settings)
    stack_secrets(settings)  # as `up` does: the secrets the lab gave are what secrets.json keeps
    [labels] = [service for service in stack.services() if service.name == "labels"]
    labels.prepare()
    written = (stack.run_dir / "labels-settings.json").read_text()
    assert (
        stat.S_IMODE((stack.run_dir / "labels-settings.json").stat().st_mode) == 0o600
    )  # a registry URI may hold a password
    assert "**" not in written and "ml_backend_password" not in written and "api_key" not in written
    child = Settings.model_validate_json(written).model_copy(update={"home": tmp_path / "home"})
    assert stack_secrets(child)["ml_backend_password"] == "m" * 20  # what the lab set, as every process reads it


@contextlib.contextmanager
def stand_in_server(port: int):
    """A real HTTP server (python -m http.server) on 127.0.0.1:`port` standing for a running service, until the
    block ends; yields its process."""
    import subprocess
    import sys
    import time

    from ops.stack import _port_open

    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not _port_open("127.0.0.1", port):
            assert time.monotonic() < deadline and server.poll() is None, "the stand-in receiver did not start"
            time.sleep(0.1)
        yield server
    finally:
        server.kill()
        server.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_status_names_the_port_a_service_runs_on_when_the_settings_moved_it(tmp_path):
    """A service started on one port and the settings changed since: status reads its health on the port it runs
    on and says the settings differ (it probed the new port and showed a running service as 'starting')."""
    import json

    from ops.stack import _identity

    running, moved = free_port(), free_port()
    with stand_in_server(running) as server:
        settings = Settings(home=tmp_path / "home", review={"webhook_port": moved}, stack={"ray": False})
        stack = Stack(settings)
        stack.run_dir.mkdir(parents=True, exist_ok=True)
        pid_file = {"pid": server.pid, "identity": _identity(server.pid), "port": running}
        (stack.run_dir / "labels.pid").write_text(json.dumps(pid_file))
        [labels] = [s for s in stack.status() if s.name == "labels"]
        assert (labels.state, labels.pid, labels.port) == ("up", server.pid, running)
        assert f"the settings say port {moved}" in labels.detail


def test_a_label_studio_venv_made_before_a_constraint_gets_it_installed(tmp_path):
    """sentry-sdk 3 broke Label Studio 1.23 (every start: "Unknown option 'send_default_pii'"); a venv built after
    it came out kept failing, since a venv marked ready was never touched again. A venv cytoloop made with other
    constraints now gets them installed, once."""
    from ops.stack import LABEL_STUDIO_CONSTRAINTS, ensure_label_studio_venv

    venv = tmp_path / "ls-venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "pip-calls.txt"
    python = venv / "bin" / "python"  # stands in for the venv's python: it notes what it was asked to run
    python.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    python.chmod(0o755)
    (venv / ".cytoloop-ready").write_text("label-studio==1.23.*\n")  # the mark of a venv made before
    settings = Settings(home=tmp_path / "home", stack={"label_studio_venv": venv})
    assert ensure_label_studio_venv(settings) == python
    pip = ["-m", "pip", "install", "-q", "label-studio==1.23.*", *LABEL_STUDIO_CONSTRAINTS]
    assert calls.read_text().split() == pip
    assert ensure_label_studio_venv(settings) == python
    assert len(calls.read_text().splitlines()) == 1  # mended once: its mark names the constraints now
    (venv / ".cytoloop-ready").write_text("label-studio==1.23.*\n")
    python.write_text("#!/bin/sh\nexit 1\n")  # pip fails: said, with where its log is
    with pytest.raises(StackError, match="updating the Label Studio venv failed.*pip.log"):
        ensure_label_studio_venv(settings)


def test_up_names_a_running_service_started_with_other_settings(tmp_path):
    """`up` kept a service already running whatever it was started with: a Ray head without the dashboard the
    settings now ask for (then a wait of the whole start-up timeout for a dashboard that never came), a Label
    Studio over another images folder (the demo's cells then failed to show). Now it says so at once."""
    import dataclasses
    import json

    from ops.stack import _identity, _launch_digests

    port = free_port()
    with stand_in_server(port) as server:
        stack = Stack(Settings(home=tmp_path / "home", review={"webhook_port": port}, stack={"ray": False}))
        stack.run_dir.mkdir(parents=True, exist_ok=True)
        [labels] = [s for s in stack.services() if s.name == "labels"]
        before = dataclasses.replace(labels, env={**labels.env, "CYTOLOOP_HOME": "/another/home"})
        pid_file = {
            "pid": server.pid,
            "identity": _identity(server.pid),
            "port": port,
            "launch": _launch_digests(before),
        }
        (stack.run_dir / "labels.pid").write_text(json.dumps(pid_file))
        with pytest.raises(
            StackError,
            match=r"labels is running .* started with other settings than these "
            r"\(CYTOLOOP_HOME\); run `cytoloop stack down` first",
        ):
            stack.up(only=["labels"])
        assert (stack.run_dir / "labels.pid").is_file() and server.poll() is None  # nothing stopped or forgotten
