"""Talking to a Label Studio server: one SDK client, and one error type for "the server is not there".

Everything that calls Label Studio goes through `connect` and catches `LabelStudioUnavailable`, so a server
that is down or restarting is an expected state (the outbox waits, the poll retries), never a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cytoloop.errors import CytoLoopError

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio


class LabelStudioUnavailable(CytoLoopError, ConnectionError):
    """Label Studio did not answer (down, restarting, wrong URL) or refused the token."""


class LabelStudioFailed(CytoLoopError, RuntimeError):
    """Label Studio answered with an error of its own (HTTP 500 and above other than those `unavailable` takes:
    its database locked under load), not a refusal of what was asked."""


def connect(url: str, token: str, timeout: float = 30.0) -> LabelStudio:
    """An SDK client after a health check; raises LabelStudioUnavailable naming the URL otherwise."""
    import httpx
    from label_studio_sdk import LabelStudio

    try:
        response = httpx.get(f"{url.rstrip('/')}/health", timeout=5.0)
    except httpx.HTTPError as error:
        raise LabelStudioUnavailable(
            f"Label Studio at {url} is not reachable ({error}); is `cytoloop stack up` running?"
        ) from error
    if response.status_code != 200:
        raise LabelStudioUnavailable(f"Label Studio at {url} answered /health with HTTP {response.status_code}")
    client = LabelStudio(base_url=url, api_key=token, timeout=timeout)
    try:
        client.users.whoami()
    except Exception as error:  # the SDK raises ApiError(401) for a bad token, httpx errors for a dropped connection
        if getattr(error, "status_code", None) in (401, 403):
            raise LabelStudioUnavailable(f"Label Studio at {url} refused the API token: {error}") from error
        # a timeout or a server error under load is not the token's fault: say what it was
        raise LabelStudioUnavailable(f"Label Studio at {url} failed to say who the API token is: {error}") from error
    return client


def server_identity(client: LabelStudio) -> str:
    """What tells this Label Studio from any other, and survives its restarts: its organisation's id and creation
    time. A recreated or migrated server (whose annotation and project ids start again at 1) has another one, so
    labels keyed by it never collide with the old server's."""
    organisations = sorted(client.organizations.list(), key=lambda o: o.id)
    if not organisations:
        raise LabelStudioUnavailable("Label Studio has no organisation (a server that was never started?)")
    from datetime import UTC, datetime

    first = organisations[0]
    created = first.created_at if isinstance(first.created_at, datetime) else datetime.fromisoformat(first.created_at)
    # letters, digits and '-' only: it travels in the webhook URL's query, unescaped where a caller forgets
    return f"org{first.id}-{created.astimezone(UTC).strftime('%Y%m%dT%H%M%S%fZ')}"


def as_failure(error: BaseException, url: str, doing: str) -> CytoLoopError | None:
    """An SDK error met while `doing` as the project's own error naming Label Studio, `doing` and what it said
    (a command then ends with that line, exit 2, not a traceback): `LabelStudioUnavailable` when it did not answer
    (down, a timeout), `LabelStudioFailed` for its own server errors; None for anything else (a bug, a refusal of
    the request), which the caller raises as it is."""
    if isinstance(error, CytoLoopError):
        return None
    status, said = getattr(error, "status_code", None), described(error)
    if unavailable(error):
        return LabelStudioUnavailable(f"Label Studio at {url} did not answer ({said}) {doing}")
    if isinstance(status, int) and status >= 500:
        return LabelStudioFailed(f"Label Studio at {url} failed ({said}) {doing}")
    return None


def described(error: BaseException) -> str:
    """What an SDK error says in a line: its HTTP status, or the transport error."""
    status = getattr(error, "status_code", None)
    return f"HTTP {status}" if status is not None else f"{type(error).__name__}: {error}"


def unavailable(error: BaseException) -> bool:
    """Whether an exception from the SDK means "server not reachable" (as opposed to a bad request)."""
    import httpx

    return isinstance(error, (httpx.TransportError, LabelStudioUnavailable)) or getattr(error, "status_code", 0) in (
        502,
        503,
        504,
    )


def invite_url(url: str, admin_token: str) -> str:
    """The organisation's invite link (`/user/signup/?token=…`), read with the admin's token. Sign-up is closed
    without it (`stack` starts Label Studio with DISABLE_SIGNUP_WITHOUT_LINK): whoever is given the link, and only
    they, can make an account. `POST /api/invite/reset-token` (Label Studio's) makes a new one and voids the old."""
    import httpx

    base = url.rstrip("/")
    response = httpx.get(f"{base}/api/invite", headers={"Authorization": f"Token {admin_token}"}, timeout=30.0)
    if response.status_code != 200:
        raise PermissionError(f"cannot read the invite link of {base} (HTTP {response.status_code}): admin token?")
    return base + response.json()["invite_url"]


def user_token(url: str, email: str, password: str, invite: str | None = None) -> tuple[int, str]:
    """(user id, API token) of a Label Studio user: logged in, or, when they have no account yet and an invite link
    is given, signed up through it first.

    This is how annotator accounts are made without a browser: Label Studio's own login and sign-up forms (sign-up
    only with the organisation's invite link, see `invite_url`), then the user's token. (Users created through the
    admin API get no usable password.)
    """
    import re
    from urllib.parse import urlsplit

    import httpx

    base = url.rstrip("/")
    forms = ["/user/login/"]
    if invite is not None:
        forms.append(f"/user/signup/?{urlsplit(invite).query}")
    with httpx.Client(base_url=base, follow_redirects=False, timeout=30.0) as session:
        for form in forms:
            session.get(form)  # sets the CSRF cookie
            csrf = session.cookies.get("csrftoken") or ""
            response = session.post(
                form,
                data={"email": email, "password": password, "csrfmiddlewaretoken": csrf},
                headers={"Referer": f"{base}{form}"},
            )
            if response.status_code == 302:
                break
        else:
            errors = re.findall(r"error[^>]*>\s*([^<]+?)\s*<", response.text) or [f"HTTP {response.status_code}"]
            what = "log in or sign up" if invite is not None else "log in (no invite link to sign up with)"
            raise PermissionError(f"cannot {what} {email} at {base}: {errors[0]}")
        token = session.get("/api/current-user/token")
        me = session.get("/api/current-user/whoami")
        if token.status_code != 200 or me.status_code != 200:
            raise PermissionError(f"logged in as {email} but could not read the token (HTTP {token.status_code})")
        return int(me.json()["id"]), token.json()["token"]
