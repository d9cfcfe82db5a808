"""`cytoloop stack up | status | down`: the local services of the review loop, started for real on one host.

- Label Studio (the labelling UI), in its own virtualenv: it is an application with its own pinned Django stack,
  so it never shares our venv. The venv is created on first use (~2 min, once per machine: it is shared by every
  checkout, under ~/.cache/cytoloop/venvs/ by default). Admin account and API token are set non-interactively on
  its first start (legacy token), passed through the server's environment, never its command line (which anyone
  on the host can read in `ps`); a new home starts from a copy of a migrated template database (~7 s; building the
  template, ~45 s of migrations, happens once per venv), later starts ~6 s. Sign-up is closed: accounts
  come through the organisation's invite link (`cytoloop review invite`). Label Studio serves every file under
  the images root to any logged-in user, so CytoLoop's home (secrets, label store, MLflow database) must lie
  outside it: `up` refuses otherwise.
- our label receiver (`cytoloop review serve`): Label Studio's webhooks, the periodic poll and the outbox push;
- MLflow: a SQLite file (nothing to start) unless `stack.mlflow_server` asks for its UI server;
- a local Ray head (`ray start --head --block`, owned by us: `down` stops exactly that one, never other Rays), on
  loopback (`stack.ray_host`); bound anywhere else it runs with Ray's token authentication.

Everything lives under `Settings.home` (default ./.cytoloop/): `stack/<service>.pid`, `stack/<service>.log`, each
service's data folder, and `secrets.json` (generated passwords and tokens, mode 0600). `up` is idempotent: a
service already running and healthy is left alone; a port taken by anything else is a clear error. Only the
standard library is used here; the services bring their own dependencies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets as secrets_lib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cytoloop.config import Settings, is_loopback
from cytoloop.errors import CytoLoopError
from cytoloop.files import locked, write_text
from cytoloop.processes import alive

logger = logging.getLogger(__name__)

SERVICES = ("label-studio", "labels", "mlflow", "ray")
# services whose leader stops its own process group in order when it alone gets SIGTERM: `ray start --block` stops
# its GCS, raylet and workers in a second or two so, where SIGTERM to the whole group left them waiting on each other
# until the SIGKILL 30 s later. The others get SIGTERM as a group (MLflow's leader alone took 5 s and left its task
# consumers running).
STOPPED_BY_LEADER = ("ray",)
# how long `down` lets Serve stop its apps on the stack's Ray before stopping Ray itself: the classifier's graceful
# stop is its requests in flight and then its prediction log's last events (services/classifier.py: 60 s in all)
SERVE_STOP_TIMEOUT_S = 75.0
RAY_TEMP_LIMIT = 60  # Ray's socket paths (temp dir + ~45 chars) must stay under 107 characters


class StackError(CytoLoopError, RuntimeError):
    """A service that cannot start (port taken, failed health check, broken venv); the message says which."""


# -- secrets -------------------------------------------------------------------------------------------------
def stack_secrets(settings: Settings) -> dict[str, str]:
    """Admin password, admin API token, webhook secret, the ML backend's password: from the settings if given, else
    generated once and kept in `<home>/secrets.json` (0600) so that every later run, and every process, uses the
    same ones."""
    path = Path(settings.home) / "secrets.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_suffix(".lock")):  # two processes starting at once generate one set
        if path.is_file() and path.stat().st_mode & 0o077:  # copied or restored readable by others: owner-only again
            logger.warning(f"{path} was readable by others; made owner-only (0600)")
            path.chmod(0o600)
        return _read_or_make_secrets(settings, path)


def _read_or_make_secrets(settings: Settings, path: Path) -> dict[str, str]:
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError) as error:  # hand-edited, or cut short: never replaced by new ones
        raise StackError(f"{path} is not a secrets file ({error}): mend it, or restore it from a backup") from None
    if not isinstance(stored, dict) or not all(isinstance(v, str) for v in stored.values()):
        raise StackError(f"{path} is not a secrets file (an object of names and strings): mend it, or restore it")
    given = {
        "admin_password": settings.stack.admin_password,
        "admin_token": settings.stack.admin_token,
        "webhook_secret": settings.review.webhook_secret,
        "ml_backend_password": settings.review.ml_backend_password,
        "ray_token": None,  # always generated: Ray's token when its head binds more than loopback
        "mlflow_admin_password": None,  # the MLflow UI's admin, when it binds more than loopback
        "mlflow_secret_key": None,
    }
    # Label Studio takes the admin's password and token only when it creates the admin: given otherwise later, they
    # replaced the stored ones (even from `stack status`) and every call to it was refused with the working token gone
    created = (
        settings.review.label_studio_url is None
        and (  # this home's own Label Studio, not a remote one
            Path(settings.home) / "label-studio" / "data" / "label_studio.sqlite3"
        ).is_file()
    )
    for key in ("admin_password", "admin_token"):
        wanted = given[key]
        if created and stored.get(key) and wanted is not None and wanted.get_secret_value() != stored[key]:
            raise StackError(
                f"stack.{key} differs from the one this home's Label Studio admin was made with ({path}): Label "
                f"Studio takes it only when it makes the admin. Unset CYTOLOOP_STACK__{key.upper()} (or give the "
                "stored one); to change it, change it in Label Studio first, then in secrets.json"
            )
    values: dict[str, str] = {k: v.get_secret_value() if v is not None else stored.get(k, "") for k, v in given.items()}
    values.update({k: secrets_lib.token_hex(20) for k, v in values.items() if not v})
    if values != {k: stored.get(k) for k in values}:  # written whole and owner-only
        write_text(path, json.dumps({**stored, **values}, indent=1), mode=0o600)
    return values


def _secret_fields(model: Any) -> dict[str, Any]:
    """Every secret field of a settings model, as pydantic's `exclude` names them. A secret written to a file is
    its mask, '**********', which a process reading the file would take for the secret itself."""
    from pydantic import BaseModel, SecretStr

    found: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, SecretStr):
            found[name] = True
        elif isinstance(value, BaseModel) and (inner := _secret_fields(value)):
            found[name] = inner
    return found


def label_studio_url(settings: Settings) -> str:
    return settings.review.label_studio_url or f"http://{settings.stack.host}:{settings.stack.label_studio_port}"


def webhook_url(settings: Settings) -> str:
    return f"http://{settings.review.webhook_host}:{settings.review.webhook_port}/webhook"


# -- the Label Studio virtualenv ----------------------------------------------------------------------------
def label_studio_venv(settings: Settings) -> Path:
    if settings.stack.label_studio_venv is not None:
        return Path(settings.stack.label_studio_venv).expanduser().resolve()
    tag = settings.stack.label_studio_version.replace("*", "x").strip("=.x") or "latest"
    return Path.home() / ".cache" / "cytoloop" / "venvs" / f"label-studio-{tag}"


# Label Studio's own requirements have no upper bounds, and later releases of them break it; held back here:
# sentry-sdk 3 dropped options label_studio.core.utils.sentry passes ("Unknown option 'send_default_pii'": every
# start failed, on any machine that built its venv after sentry-sdk 3.0 came out).
LABEL_STUDIO_CONSTRAINTS = ("sentry-sdk<3",)


def ensure_label_studio_venv(settings: Settings) -> Path:
    """The Label Studio venv's python, creating the venv on first use (pip, ~2 min).

    Built in `<venv>.partial` and renamed when pip succeeded, under a file lock: a half-built venv is never
    used, and two processes (two test sessions) never build it at once. Its `.cytoloop-ready` mark holds what was
    installed (the specifier and `LABEL_STUDIO_CONSTRAINTS`); a venv cytoloop made with other constraints gets
    them installed in place (seconds), so a machine whose venv took a breaking release is mended, not stuck.
    """
    venv = label_studio_venv(settings)
    python = venv / "bin" / "python"
    ready = venv / ".cytoloop-ready"
    spec = f"label-studio=={settings.stack.label_studio_version}"
    recipe = [spec, *LABEL_STUDIO_CONSTRAINTS]
    if ready.is_file():
        if ready.read_text().split() != recipe:
            _mend_label_studio_venv(venv, recipe)
        return python
    if venv.exists():  # not one we made: never replaced (it may be the user's own, or a folder of other things)
        if python.exists() and (venv / "bin" / "label-studio").exists():
            return python  # a Label Studio venv the user made: used as it is
        if not venv.is_dir() or any(venv.iterdir()):
            raise StackError(
                f"stack.label_studio_venv {venv} exists but is neither a Label Studio venv nor one cytoloop made: "
                "name a Label Studio venv, or a path that does not exist yet for cytoloop to create it"
            )
    venv.parent.mkdir(parents=True, exist_ok=True)
    with locked(venv.parent / f"{venv.name}.lock"):
        if ready.is_file():
            return python
        partial = venv.parent / f"{venv.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        logger.info(f"creating the Label Studio venv at {venv} (once per machine, ~2 min)")
        base = getattr(sys, "_base_executable", sys.executable)
        pip_log = venv.parent / f"{venv.name}.pip.log"
        with pip_log.open("w") as out:
            for command in (
                [base, "-m", "venv", str(partial)],
                [str(partial / "bin" / "python"), "-m", "pip", "install", "-q", *recipe],
            ):
                if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                    raise StackError(f"creating the Label Studio venv failed ({' '.join(command)}); see {pip_log}")
        if venv.is_dir():
            venv.rmdir()  # empty (checked above): nothing of anyone's is lost
        partial.rename(venv)  # the venv's python is a symlink and `python -m` is used: a renamed venv works
        ready.write_text("\n".join(recipe) + "\n")
    return python


def _mend_label_studio_venv(venv: Path, recipe: list[str]) -> None:
    """Install `recipe` into a venv cytoloop made with another one (`ensure_label_studio_venv`), under its lock."""
    ready = venv / ".cytoloop-ready"
    with locked(venv.parent / f"{venv.name}.lock"):
        if ready.read_text().split() == recipe:  # another process mended it while this one waited
            return
        logger.info(f"installing {' '.join(recipe)} into the Label Studio venv at {venv}")
        pip_log = venv.parent / f"{venv.name}.pip.log"
        command = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *recipe]
        with pip_log.open("w") as out:
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise StackError(f"updating the Label Studio venv failed ({' '.join(command)}); see {pip_log}")
        ready.write_text("\n".join(recipe) + "\n")


MIGRATE = (
    "import label_studio.server as s; s._setup_env(); from django.core.management import call_command; "
    "call_command('migrate', '--no-color', verbosity=0)"
)


def label_studio_database_template(settings: Settings) -> Path:
    """A freshly migrated, empty Label Studio database, built once per venv (~45 s, more on a busy machine).

    A new home folder starts from a copy of it, so a first start skips the migrations (~45 s -> ~6 s): what makes a
    fresh Label Studio per test session affordable. Users, organisation and token are still created by the first
    `start` (the template holds none).
    """
    python = ensure_label_studio_venv(settings)
    venv = python.parent.parent
    template = venv / "cytoloop-db-template" / "label_studio.sqlite3"
    if template.is_file():
        return template
    with locked(venv.parent / f"{venv.name}.lock"):
        if template.is_file():
            return template
        logger.info(f"migrating a template Label Studio database in {template.parent} (once per venv)")
        partial = venv / "cytoloop-db-template.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        env = {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(partial), "HOME": str(partial), "TMPDIR": str(partial)}
        env.pop("VIRTUAL_ENV", None)
        done = subprocess.run([str(python), "-c", MIGRATE], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"migrating the Label Studio template database failed:\n{done.stderr[-2000:]}")
        for extra in partial.iterdir():  # keep only the database
            if extra.name != template.name:
                shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
        partial.rename(template.parent)
    return template


# -- processes ----------------------------------------------------------------------------------------------
@dataclass
class Service:
    """How to start one service and tell that it is healthy."""

    name: str
    port: int
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_url: str | None = None  # None: healthy once the port accepts connections
    health_headers: dict[str, str] = field(default_factory=dict)  # sent with the health check (a token)
    prepare: Callable[[], None] | None = None  # slow set-up to run only when the service must start
    # an API the started process answers at, kept in its PID file: `down` asks the process it started there,
    # whatever the settings say by then (Ray's dashboard, through which `down` stops Serve first)
    api_url: str | None = None
    # other ports it binds, checked free before it starts as `port` is: Ray's dashboard, taken by another program,
    # answered the health check in its place ("up") while our head died
    other_ports: tuple[int, ...] = ()


@dataclass
class ServiceStatus:
    name: str
    state: str  # "up", "down", "starting", "stale" (pid file without process), "disabled"
    pid: int | None = None
    port: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class DownRequest:
    """A waiting `stack down`'s request that the `up` in progress stop (`Stack._one_at_a_time`)."""

    path: Path
    pid: int
    only: list[str] | None  # the services it stops; None: all


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def _launch_digests(service: Service) -> dict:
    """How a service is started, as digests (its environment holds credentials, its command may): compared by
    `up` with how the running one was started."""
    import hashlib

    def digest(value: object) -> str:
        return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]

    return {"command": digest(service.command), "env": {name: digest(v) for name, v in service.env.items()}}


def _identity(pid: int) -> str | None:
    """Who a PID is: this boot's id and the process's start time (Linux /proc); None when it cannot be told.

    A PID file outlives its process (a crash, a reboot) and the kernel reuses PIDs, so a stored PID alone may
    name a stranger; the PID with the start time it had names one process only."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return f"{boot}:{fields[19]}"  # field 22 of stat: start time, in clock ticks since boot


class Stack:
    """The services of one home folder. Every method may be called any number of times."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.home = Path(settings.home).resolve()
        self.run_dir = self.home / "stack"

    # -- what runs where --------------------------------------------------------------------------------------
    def service_names(self) -> list[str]:
        """The services this stack runs, as `services()` builds them (without building them: that writes secrets)."""
        cfg = self.settings.stack
        enabled = {"label-studio": True, "labels": True, "mlflow": cfg.mlflow_server, "ray": cfg.ray}
        return [name for name in SERVICES if enabled[name]]

    def services(self) -> list[Service]:
        cfg = self.settings.stack
        names = self.service_names()
        chosen = [self._label_studio(), self._labels()]
        if "mlflow" in names:
            chosen.append(self._mlflow())
        if "ray" in names:
            temp = self.home / "ray"
            if len(str(temp)) > RAY_TEMP_LIMIT:
                raise StackError(
                    f"Ray's temp folder {temp} is longer than {RAY_TEMP_LIMIT} characters (its socket "
                    "paths would pass the OS limit of 107); use a shorter CYTOLOOP_HOME"
                )
            command = [
                str(Path(sys.executable).parent / "ray"),
                "start",
                "--head",
                "--block",
                "--port",
                str(cfg.ray_port),
                "--node-ip-address",
                cfg.ray_host,
                "--temp-dir",
                str(temp),
                "--disable-usage-stats",
            ]
            if cfg.ray_dashboard:  # the dashboard also serves the Ray Jobs API (`ray job submit`)
                command += [
                    "--include-dashboard=true",
                    "--dashboard-host",
                    cfg.ray_host,
                    "--dashboard-port",
                    str(cfg.ray_dashboard_port),
                ]
            else:
                command += ["--include-dashboard=false"]
            if cfg.ray_num_cpus:
                command += ["--num-cpus", str(cfg.ray_num_cpus)]
            # workers otherwise start at niceness +15 and, on a busy machine, Serve's proxy misses its start-up checks
            # on loopback only this host's users reach it; anywhere else Ray's token authentication is on
            auth = self.ray_client_environment()  # the head's own, as its drivers need it
            # with the dashboard, Ray is up once its Jobs API answers (`ray job submit`; the GCS port opens first)
            health_url, health_headers = self._ray_api("/api/jobs/") if cfg.ray_dashboard else (None, {})
            env = {**auth, "RAY_worker_niceness": "0"}
            api_url = self._ray_api("")[0] if cfg.ray_dashboard else None
            dashboard = (cfg.ray_dashboard_port,) if cfg.ray_dashboard else ()
            chosen.append(
                Service(
                    "ray",
                    cfg.ray_port,
                    command,
                    env,
                    health_url,
                    health_headers,
                    api_url=api_url,
                    other_ports=dashboard,
                )
            )
        return chosen

    def ray_client_environment(self) -> dict[str, str]:
        """The environment a Ray driver needs to join this stack's head: its token off loopback (the head runs with
        token authentication there, and a driver without it is refused), none needed on loopback."""
        cfg = self.settings.stack
        if is_loopback(cfg.ray_host):
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": stack_secrets(self.settings)["ray_token"]}

    def _ray_api(self, path: str, base: str | None = None) -> tuple[str, dict[str, str]]:
        """A URL of the Ray head's dashboard API (at `base`, else where the settings put it), and the headers it
        asks of a caller (its token, off loopback)."""
        cfg = self.settings.stack
        base = base or f"http://{cfg.ray_host}:{cfg.ray_dashboard_port}"
        loopback = is_loopback(urllib.parse.urlsplit(base).hostname or "")
        token = None if loopback else stack_secrets(self.settings)["ray_token"]
        return f"{base}{path}", ({"Authorization": f"Bearer {token}"} if token else {})

    def mlflow_db(self) -> Path:
        uri = self.settings.registry.tracking_uri
        if uri.startswith("sqlite:///"):
            return Path(uri.removeprefix("sqlite:///")).resolve()
        return self.home / "mlflow" / "mlflow.db"

    def _images_root(self) -> Path:
        """`stack.images_root`, checked: set, below /, and its parent, the folder Label Studio serves from (any
        logged-in user may add a storage on any folder under it), holding none of CytoLoop's own files. The check
        was of the images folder alone, so the layout the deploy docs suggested, `/data/cells` beside the home
        `/data/cytoloop`, put secrets.json, the label store and Label Studio's database within any annotator's
        reach."""
        if self.settings.stack.images_root is None:
            raise StackError(
                "stack.images_root is not set: the folder of cell images Label Studio may serve "
                "(CYTOLOOP_STACK__IMAGES_ROOT=/path/to/cells)"
            )
        images_root = Path(self.settings.stack.images_root).resolve()
        if images_root == images_root.parent:
            raise StackError("stack.images_root must be a folder below / (Label Studio serves images under its parent)")
        served = images_root.parent
        for what, path in (("home", self.home), ("the MLflow database", self.mlflow_db())):
            if path.resolve().is_relative_to(served):
                raise StackError(
                    f"{what} ({path.resolve()}) lies inside {served}, the parent of stack.images_root, from which "
                    "Label Studio serves files to any logged-in user (each may add a storage on any folder under it): "
                    "secrets, labels and the registry would be readable. Put CYTOLOOP_HOME (and the MLflow "
                    f"database) outside {served}, or the images one folder deeper (e.g. {served}/images/"
                    f"{images_root.name})."
                )
        return images_root

    def _mlflow(self) -> Service:
        """The MLflow UI server. On loopback it is for this host's users; on any other address it runs MLflow's
        basic-auth app: users in `<home>/mlflow/auth.db`, admin `admin` with `mlflow_admin_password` of
        secrets.json (clients: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."""
        cfg, host = self.settings.stack, self.settings.stack.host
        db = self.mlflow_db()
        command = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--default-artifact-root",
            str(db.parent / "artifacts"),
            "--host",
            host,
            "--port",
            str(cfg.mlflow_port),
            "--workers",
            "1",
        ]
        env = {"MLFLOW_DISABLE_TELEMETRY": "true"}
        auth = db.parent / "auth.ini"

        def prepare() -> None:
            auth.write_text(
                "[mlflow]\ndefault_permission = READ\n"
                f"database_uri = sqlite:///{db.parent / 'auth.db'}\n"
                "admin_username = admin\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            )

        if is_loopback(host):
            return Service(
                "mlflow", cfg.mlflow_port, command, env=env, health_url=f"http://{host}:{cfg.mlflow_port}/health"
            )
        # MLflow answers only the Host names it is told (its DNS-rebinding protection)
        allowed = [f"{name}:*" for name in ("localhost", "127.0.0.1", host, *cfg.mlflow_allowed_hosts)]
        secret = stack_secrets(self.settings)
        env |= {
            "MLFLOW_AUTH_CONFIG_PATH": str(auth),
            "MLFLOW_AUTH_ADMIN_PASSWORD": secret["mlflow_admin_password"],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["mlflow_secret_key"],
        }
        return Service(
            "mlflow",
            cfg.mlflow_port,
            [*command, "--app-name", "basic-auth", "--allowed-hosts", ",".join(allowed)],
            env=env,
            health_url=f"http://{host}:{cfg.mlflow_port}/health",
            prepare=prepare,
        )

    def _label_studio(self) -> Service:
        cfg, host = self.settings.stack, self.settings.stack.host
        secret = stack_secrets(self.settings)
        data = self.home / "label-studio"
        venv = label_studio_venv(self.settings)
        env = {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data / "data"),
            "HOME": str(data / "home"),
            "TMPDIR": str(data / "tmp"),
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",  # our webhook receiver is on 127.0.0.1
            "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",  # and so is the ML backend (labelstudio/ml_backend.py)
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
            "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",  # accounts only through the invite link
            # the admin's credentials: in the environment (readable by its owner only), not on the command line
            "LABEL_STUDIO_USERNAME": cfg.admin_email,
            "LABEL_STUDIO_PASSWORD": secret["admin_password"],
            "LABEL_STUDIO_USER_TOKEN": secret["admin_token"],
        }
        if cfg.images_root is not None:  # checked by `up` (`_images_root`); unset is fine for `--only labels`
            # the root is the images folder's parent: Label Studio refuses a project storage equal to the root
            env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] = str(Path(cfg.images_root).resolve().parent)

        def prepare() -> None:
            self._images_root()
            for folder in ("data", "home", "tmp"):
                (data / folder).mkdir(parents=True, exist_ok=True)
            # its database holds the admin's API token in plain text: this host's other users keep out (the
            # folder was the umask's 0755 and the database 0644, while secrets.json is 0600)
            data.chmod(0o700)
            database = data / "data" / "label_studio.sqlite3"
            if not database.exists():  # copied whole or not at all: a copy cut short passed for a database after
                staging = database.with_name(f".{database.name}.{os.getpid()}.tmp")
                shutil.copyfile(label_studio_database_template(self.settings), staging)
                with staging.open("rb+") as copied:
                    os.fsync(copied.fileno())
                os.replace(staging, database)

        return Service(
            "label-studio",
            cfg.label_studio_port,
            [
                str(venv / "bin" / "python"),
                "-m",
                "label_studio.server",
                "start",
                "--no-browser",
                "--internal-host",
                host,
                "--port",
                str(cfg.label_studio_port),
                "--enable-legacy-api-token",
            ],
            env=env,
            health_url=f"http://{host}:{cfg.label_studio_port}/health",
            prepare=prepare,
        )

    def _labels(self) -> Service:
        review = self.settings.review
        settings_file = self.run_dir / "labels-settings.json"

        def prepare() -> None:  # the child gets exactly this configuration (secrets stay in secrets.json)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            leave_out = {"home": True, **_secret_fields(self.settings)}
            # owner-only: a registry address may hold a user and password
            write_text(settings_file, self.settings.model_dump_json(exclude=leave_out, exclude_none=True), mode=0o600)

        return Service(
            "labels",
            review.webhook_port,
            [sys.executable, "-m", "ops.cli", "review", "serve", "--config", str(settings_file)],
            env={"CYTOLOOP_HOME": str(self.home)},
            health_url=f"http://{review.webhook_host}:{review.webhook_port}/health",
            prepare=prepare,
        )

    # -- state ----------------------------------------------------------------------------------------------
    def _pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def _pid(self, name: str) -> int | None:
        """The PID of the process this home started for `name`, if that very process still runs: a PID file whose
        process is gone, or whose PID now belongs to another process (same PID, other start), gives None."""
        path = self._pid_file(name)
        try:
            recorded = json.loads(path.read_text())
            pid = int(recorded["pid"])
        except (FileNotFoundError, ValueError, KeyError):
            return None
        if not alive(pid) or recorded.get("identity") is None or recorded["identity"] != _identity(pid):
            return None
        return pid

    def _bind_host(self, service: Service) -> str:
        """The address the service listens on: where its port is probed before it starts and checked after."""
        return {"labels": self.settings.review.webhook_host, "ray": self.settings.stack.ray_host}.get(
            service.name, self.settings.stack.host
        )

    def _healthy(self, service: Service) -> bool:
        if service.health_url is None:
            return _port_open(self._bind_host(service), service.port)
        try:
            request = urllib.request.Request(service.health_url, headers=service.health_headers)
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def status(self) -> list[ServiceStatus]:
        found = []
        by_name = {s.name: s for s in self.services()}
        for name in SERVICES:
            service = by_name.get(name)
            if service is None:
                detail = f"SQLite file {self.mlflow_db()}" if name == "mlflow" else "not enabled"
                found.append(ServiceStatus(name, "disabled", detail=detail))
                continue
            pid = self._pid(name)
            if pid is None and self._pid_file(name).is_file():
                detail = "pid file of a process that is gone (or whose PID another process now has)"
                found.append(ServiceStatus(name, "stale", None, service.port, detail))
            elif pid is None:
                found.append(ServiceStatus(name, "down", port=service.port))
            elif (running := self._recorded_port(name)) not in (None, service.port):  # started under other settings
                state = "up" if _port_open(self._bind_host(service), running) else "starting"
                detail = f"the settings say port {service.port}: `cytoloop stack down` first to move it"
                found.append(ServiceStatus(name, state, pid, running, detail))
            else:
                state = "up" if self._healthy(service) else "starting"
                found.append(ServiceStatus(name, state, pid, service.port, str(self.log_file(name))))
        return found

    def _launched_otherwise(self, service: Service) -> str | None:
        """What `service`'s running process was started with that these settings would not start it with (its
        command, the names of its environment variables that differ), from its PID file; None when nothing, or a
        file from before launches were recorded. `up` kept a Ray head started without the dashboard these settings
        ask for, then waited out its start-up timeout on a dashboard that never came, and a Label Studio serving
        another images folder, whose cells then failed to show."""
        try:
            recorded = json.loads(self._pid_file(service.name).read_text()).get("launch")
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(recorded, dict):
            return None
        now = _launch_digests(service)
        differs = ["its command"] if recorded.get("command") != now["command"] else []
        was, env = recorded.get("env") or {}, now["env"]
        differs += sorted(name for name in {*was, *env} if was.get(name) != env.get(name))
        return ", ".join(differs) or None

    def _recorded_port(self, name: str) -> int | None:
        """The port `name`'s running process was started on (its PID file), whatever the settings say now."""
        try:
            return json.loads(self._pid_file(name).read_text()).get("port")
        except (OSError, ValueError, AttributeError):
            return None

    # -- up / down ------------------------------------------------------------------------------------------
    def up(self, only: list[str] | None = None) -> list[ServiceStatus]:
        """Start what is not running yet, wait until each answers its health check; returns the status. `only`
        names services this stack runs; another name (a typo, a service the settings turn off) is an error."""
        if only is not None:
            self._check_names(only, self.service_names())
        if only is None or "label-studio" in only:
            self._images_root()  # refused before anything is created under home
        self.mlflow_db().parent.mkdir(parents=True, exist_ok=True)
        with self._one_at_a_time(stoppable=True):
            for service in self.services():
                if only is None or service.name in only:
                    self._stop_if_down_asked(service.name)
                    self._start(service)
        return self.status()

    @contextlib.contextmanager
    def _one_at_a_time(self, stoppable: bool = False, only: list[str] | None = None) -> Iterator[None]:
        """One `up` or `down` at a time per home. Two `up`s at once both saw no PID and a free port, both started
        the service, and the PID file could name the one that lost the port while the other ran on, beyond
        `down`'s reach; a `down` between an `up`'s start of a service and its PID file removed nothing, and the
        service ran on unrecorded. A `down` during an `up` waits for it, then stops what it started.

        A `down` that has to wait leaves a request beside the lock; an `up` (`stoppable`) gives up at its next
        step (`_stop_if_down_asked`: before a service, and while one starts), so `down` is not kept waiting for a
        service that may never become healthy (up to `stack.start_timeout_s` each). Each waiting `down` has a
        request of its own (two shared one file, and the first to finish removed the other's), naming its process
        and the services it stops (`--only`): one left by a `down` that is gone (killed while it waited) stops
        nothing and is cleared by the next `up`; a `down` takes its own request back when it ends, interrupted
        while it waits too; an `up` goes on with services no waiting `down` stops."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        mine: Path | None = None
        with open(self.run_dir / "up.lock", "w") as lock:
            try:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not stoppable:
                        mine = self._ask_up_to_stop(only)
                    logger.info(f"waiting for the `stack up` or `down` in progress on {self.home} to finish")
                    fcntl.flock(lock, fcntl.LOCK_EX)
                if stoppable:
                    for request in self._down_requests():
                        if not alive(request.pid):  # left by a `down` that is gone
                            request.path.unlink(missing_ok=True)
                yield
            finally:
                if mine is not None:
                    mine.unlink(missing_ok=True)

    def _ask_up_to_stop(self, only: list[str] | None) -> Path:
        """Leave this `down`'s request to stop beside the lock (`_one_at_a_time`); its path."""
        path = self.run_dir / f"down.{os.getpid()}.{secrets_lib.token_hex(4)}.requested"
        write_text(path, json.dumps({"pid": os.getpid(), "only": only}))  # whole or not at all
        return path

    def _down_requests(self) -> list[DownRequest]:
        """The requests to stop that waiting `down`s left (a `down` that is gone left its own behind)."""
        found = []
        for path in sorted(self.run_dir.glob("down.*.requested")):
            try:
                request = json.loads(path.read_text())
                pid, only = int(request["pid"]), request["only"]
            except (OSError, ValueError, TypeError, KeyError):
                continue  # being removed, or not one of ours
            found.append(DownRequest(path, pid, only))
        return found

    def _down_waiting(self, name: str | None = None) -> bool:
        """Whether a `stack down` that is still running asked for the `up` to stop (`_one_at_a_time`); given a
        service's `name`, whether such a `down` stops that service (a `down --only` lets an `up` start the others)."""
        return any(alive(r.pid) and (name is None or r.only is None or name in r.only) for r in self._down_requests())

    def _stop_if_down_asked(self, name: str) -> None:
        """Raise if a `stack down` waits for this `up` and stops `name` (see `_one_at_a_time`)."""
        if self._down_waiting(name):
            raise StackError(f"stack up stopped at {name}: `cytoloop stack down` was asked for meanwhile")

    def _start(self, service: Service) -> None:
        host = self._bind_host(service)
        pid = self._pid(service.name)
        if pid is not None:
            running_port = self._recorded_port(service.name)
            if running_port != service.port:
                raise StackError(
                    f"{service.name} is running on port {running_port} (pid {pid}) but the settings say "
                    f"{service.port}; run `cytoloop stack down` first to move it"
                )
            if differs := self._launched_otherwise(service):
                raise StackError(
                    f"{service.name} is running (pid {pid}) started with other settings than these ({differs}); "
                    "run `cytoloop stack down` first to start it with these"
                )
            self._wait_healthy(service, pid)
            logger.info(f"{service.name}: already up (pid {pid})")
            return
        if (group := self._orphaned_group(service.name)) is not None:  # its PID file is how `down` finds the group
            raise StackError(
                f"{service.name}'s first process (pid {group}) has died, but the rest of its process group runs on "
                "and holds its port: `cytoloop stack down` stops it; then `stack up` again"
            )
        self._pid_file(service.name).unlink(missing_ok=True)
        self._refuse_taken_ports(service, host)
        if service.prepare is not None:
            service.prepare()  # minutes on a first run (Label Studio's venv): the ports are checked again after it
            self._refuse_taken_ports(service, host)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        env.update(service.env)
        logger.info(f"{service.name}: starting on {host}:{service.port} (log: {self.log_file(service.name)})")
        with self.log_file(service.name).open("ab") as log:
            process = subprocess.Popen(
                service.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=Path.cwd(),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
        write_text(  # whole or not at all: `status` read half a file as a stale one
            self._pid_file(service.name),
            json.dumps(
                {
                    "pid": process.pid,
                    "identity": _identity(process.pid),
                    "port": service.port,
                    "api": service.api_url,
                    "command": service.command[:3],
                    "launch": _launch_digests(service),
                }
            ),
            mode=0o600,
        )
        started = time.monotonic()
        self._wait_healthy(service, process.pid)
        logger.info(f"{service.name}: up (pid {process.pid}, healthy after {time.monotonic() - started:.0f} s)")

    def _refuse_taken_ports(self, service: Service, host: str) -> None:
        """A port of the service already listened on is an error naming it. Label Studio is probed on loopback too:
        finding its port taken there it starts on the next one without a word, and the health check then found
        whatever held the port (another home's Label Studio answering for ours)."""
        hosts = dict.fromkeys([host, "127.0.0.1"] if service.name == "label-studio" else [host])
        for port in (service.port, *service.other_ports):
            for probed in hosts:
                if _port_open(probed, port):
                    raise StackError(
                        f"{service.name}: port {port} on {probed} is taken by another process; stop it or "
                        f"choose another port (CYTOLOOP_STACK__* / CYTOLOOP_REVIEW__WEBHOOK_PORT)"
                    )

    def _wait_healthy(self, service: Service, pid: int) -> None:
        deadline = time.monotonic() + self.settings.stack.start_timeout_s
        while True:
            if not alive(pid):  # checked first: another process answering on the port is not ours being up
                survivors = self._orphaned_group(service.name) is not None
                if not survivors:  # else its PID file is how `down` finds the rest of the group
                    self._pid_file(service.name).unlink(missing_ok=True)
                raise StackError(
                    f"{service.name} exited during start-up"
                    + (" (the rest of its process group runs on: `cytoloop stack down` stops it)" if survivors else "")
                    + f"; last lines of {self.log_file(service.name)}:\n{self._tail(service.name)}"
                )
            if self._healthy(service):
                return
            self._stop_if_down_asked(service.name)
            if time.monotonic() > deadline:
                raise StackError(
                    f"{service.name} did not become healthy within {self.settings.stack.start_timeout_s:.0f} s "
                    f"(stack.start_timeout_s); it still runs (pid {pid}): `cytoloop stack down` stops it. See "
                    f"{self.log_file(service.name)}:\n{self._tail(service.name)}"
                )
            time.sleep(0.5)

    def _tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_file(name).read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    @staticmethod
    def _check_names(only: list[str], known: list[str]) -> None:
        unknown = [name for name in only if name not in known]
        if unknown:
            raise StackError(f"no service {', '.join(unknown)} in this stack; its services: {', '.join(known)}")

    def down(self, only: list[str] | None = None, timeout_s: float = 30.0) -> list[str]:
        """Stop the services this home folder started (their whole process groups); returns the ones stopped.
        A PID file whose PID now names another process (after a reboot, or reused) is removed, never signalled."""
        if only is not None:
            self._check_names(only, list(SERVICES))
        if not self.run_dir.is_dir():
            return []  # this home never started anything
        stopped = []
        with self._one_at_a_time(only=only):
            for name in reversed(SERVICES):
                if only is not None and name not in only:
                    continue
                pid = self._pid(name)  # None unless it is still the very process this home started
                if pid is not None:
                    if name == "ray":
                        self._stop_serve()
                    self._kill_group(name, pid, timeout_s)
                    stopped.append(name)
                elif (orphaned := self._orphaned_group(name)) is not None:
                    logger.warning(f"{name}: its first process is gone, the rest of its group (pid {orphaned}) stops")
                    self._kill_group(name, orphaned, timeout_s, leader=False)
                    stopped.append(name)
                self._pid_file(name).unlink(missing_ok=True)
        return stopped

    def _orphaned_group(self, name: str) -> int | None:
        """The process group this home started for `name` when its first process died (killed, out of memory) and
        the rest of the group runs on (MLflow's workers, Label Studio's): `down` said "nothing was running" and
        dropped the PID file, and the survivors kept the port for good. A group's id is its first process's PID,
        which the kernel gives no other process while the group lives, so on the same boot the group is ours."""
        try:
            recorded = json.loads(self._pid_file(name).read_text())
            pid, identity = int(recorded["pid"]), str(recorded["identity"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        own = _identity(os.getpid())
        if own is None or identity.split(":")[0] != own.split(":")[0] or alive(pid):  # another boot, or it runs
            return None
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # a group of another user's: never ours
            return None
        return pid

    def _started_dashboard(self) -> str | None:
        """The dashboard URL the running Ray head was started with (`Service.api_url`, None: without one); a PID
        file written before URLs were recorded gives the settings' URL, as `down` asked before."""
        try:
            recorded = json.loads(self._pid_file("ray").read_text())
        except (OSError, ValueError):
            recorded = {}
        if isinstance(recorded, dict) and "api" in recorded:
            return recorded["api"]
        return self._ray_api("")[0] if self.settings.stack.ray_dashboard else None

    def _stop_serve(self) -> None:
        """Shut Serve down on the stack's Ray before stopping Ray, through the dashboard's Serve API (nothing to do
        where Serve is not running). Stopped under Serve, Ray waited for Serve's actors until `down` killed them all
        30 s later, with whatever prediction-log events the replicas still held; Serve's graceful stop lets each
        replica end its requests and write those events (`Classifier.__del__`), and Ray then stops in seconds.

        The dashboard's DELETE returns once Serve has stopped or after 30 s (Ray's own limit), so `down` then asks
        until no app is listed, up to `SERVE_STOP_TIMEOUT_S` in all. Best effort: without the dashboard, when it
        does not answer, or when Serve has not stopped by then, Ray is stopped as before, and that is logged.
        It asks the dashboard the running head was started with (`_started_dashboard`), not the settings' now: a
        `down` after the ports were changed still reaches it."""
        deadline = time.monotonic() + SERVE_STOP_TIMEOUT_S
        try:  # all of it: even reading where the dashboard is (a damaged secrets file) must not keep Ray running
            api_url = self._started_dashboard()
            if api_url is None:
                return
            url, headers = self._ray_api("/api/serve/applications/", base=api_url)
            request = urllib.request.Request(url, headers=headers, method="DELETE")
            with urllib.request.urlopen(request, timeout=SERVE_STOP_TIMEOUT_S):
                pass
            while True:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as answer:
                    left = sorted(json.loads(answer.read()).get("applications") or {})
                if not left:
                    return
                if time.monotonic() > deadline:
                    logger.warning(
                        f"ray: Serve's apps {', '.join(left)} still stopping after {SERVE_STOP_TIMEOUT_S:g} s; "
                        "their replicas stop with Ray"
                    )
                    return
                time.sleep(0.5)
        except Exception as error:  # best effort: Ray is stopped either way
            logger.warning(f"ray: Serve could not be shut down first ({error}); its replicas stop with Ray")

    @staticmethod
    def _kill_group(name: str, pid: int, timeout_s: float, leader: bool = True) -> None:
        """Stop a service's process group: SIGTERM (to its leader alone where it stops the rest itself,
        `STOPPED_BY_LEADER`, and the leader is there: `leader`), up to `timeout_s` for the whole group to end, then
        SIGKILL for what is left."""

        def gone() -> bool:
            if alive(pid):  # first: it reaps a leader that is our own child's zombie
                return False
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return True
            return False

        for send, sig, wait in (
            (os.kill if name in STOPPED_BY_LEADER and leader else os.killpg, signal.SIGTERM, timeout_s),
            (os.killpg, signal.SIGKILL, 5.0),
        ):
            if gone():
                return
            if sig == signal.SIGKILL:
                logger.warning(f"{name} (pid {pid}) did not stop on SIGTERM within {timeout_s:g} s; killing it")
            with contextlib.suppress(ProcessLookupError):
                send(pid, sig)
            deadline = time.monotonic() + wait
            while not gone() and time.monotonic() < deadline:
                time.sleep(0.1)
