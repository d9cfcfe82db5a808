"""Label store, outbox, label config and webhook receiver, without a Label Studio: idempotency above all."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from labelstudio.bootstrap import SECRET_HEADER
from labelstudio.label_config import (
    ABNORMAL,
    ARTEFACT,
    OTHER,
    build_label_config,
    config_classes,
    parse_result,
    prediction_result,
)
from labelstudio.outbox import Outbox
from labelstudio.store import LabelStore
from labelstudio.webhook import create_app

TASK = {
    "id": 7,
    "project": 3,
    "data": {
        "task_key": "jtsc:a.bmp@v1",
        "cell_id": "a.bmp",
        "site": "jtsc",
        "domain": "jtsc",
        "image_path": "/x/a.bmp",
        "model_version": "v1",
        "model_label": "neutrophil",
    },
}


def annotation(ann_id, label, updated, who=1, abnormal=False):
    result = prediction_result(label)
    if abnormal:
        result.append({"from_name": "flags", "to_name": "image", "type": "choices", "value": {"choices": [ABNORMAL]}})
    return {
        "id": ann_id,
        "task": 7,
        "project": 3,
        "completed_by": who,
        "result": result,
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": updated,
    }


@pytest.fixture
def store(tmp_path):
    return LabelStore(tmp_path / "labels.db")


def test_updates_replace_and_replays_change_nothing(store):
    assert store.upsert(annotation(1, "neutrophil", "2026-01-01T00:00:01Z"), TASK, "webhook")
    assert not store.upsert(annotation(1, "neutrophil", "2026-01-01T00:00:01Z"), TASK, "poll")  # replay
    assert store.upsert(annotation(1, "lymphocyte", "2026-01-01T00:00:02Z"), TASK, "webhook")  # update
    assert not store.upsert(annotation(1, "neutrophil", "2026-01-01T00:00:01Z"), TASK, "webhook")  # stale replay
    [label] = store.labels()
    assert (label.annotation_id, label.label, label.cell_id, label.model_version) == (1, "lymphocyte", "a.bmp", "v1")
    assert store.counts() == {"annotations": 1, "retracted": 0, "live": 1}


def test_an_update_is_newer_by_time_not_by_text(store):
    """'…:01.5Z' after '…:01Z' (Label Studio drops microseconds of 0): as text it sorted first ('.' < 'Z'), and
    the update was dropped as stale."""
    assert store.upsert(annotation(1, "neutrophil", "2026-01-01T00:00:01Z"), TASK, "webhook")
    assert store.upsert(annotation(1, "lymphocyte", "2026-01-01T00:00:01.500000Z"), TASK, "webhook")
    assert not store.upsert(annotation(1, "neutrophil", "2026-01-01T00:00:01.200000Z"), TASK, "poll")  # stale
    assert [label.label for label in store.labels()] == ["lymphocyte"]


def test_deletes_retract_for_good(store):
    store.upsert(annotation(1, "neutrophil", "2026-01-01T00:00:01Z"), TASK, "webhook")
    assert store.retract(1)
    assert not store.retract(1)
    assert not store.upsert(annotation(1, "neutrophil", "2026-01-01T00:00:09Z"), TASK, "poll")  # no resurrection
    assert store.labels() == [] and store.counts()["retracted"] == 1
    assert store.retract(2)  # a delete seen before its create leaves a tombstone
    assert not store.upsert(annotation(2, "neutrophil", "2026-01-01T00:00:01Z"), TASK, "webhook")


def test_a_poll_snapshot_lists_the_live_rows_of_one_project(store):
    for i in (1, 2, 3):
        store.upsert(annotation(i, "neutrophil", "2026-01-01T00:00:01Z", who=i), TASK, "poll")
    store.retract(2)
    assert store.live_ids(3) == {1, 3} and store.live_ids(99) == set()
    assert store.is_retracted(2) and not store.is_retracted(1) and not store.is_retracted(42)


def test_only_label_studios_own_word_restores_a_retracted_label(store):
    store.upsert(annotation(1, "neutrophil", "2026-01-01T00:00:01Z"), TASK, "poll")
    store.retract(1)  # a listing that missed it
    assert not store.upsert(annotation(1, "neutrophil", "2026-01-01T00:00:01Z"), TASK, "poll")  # a listing: no
    assert store.restore(annotation(1, "neutrophil", "2026-01-01T00:00:01Z"), TASK)  # asked directly: yes
    [label] = store.labels()
    assert (label.annotation_id, label.label) == (1, "neutrophil") and store.counts()["retracted"] == 0
    assert not store.restore(annotation(1, "neutrophil", "2026-01-01T00:00:01Z"), TASK)  # live already
    store.retract(1)  # Label Studio's copy carries no time at all: restored with what it holds now, and said so
    timeless = {k: v for k, v in annotation(1, "lymphocyte", "").items() if k not in ("created_at", "updated_at")}
    assert store.restore(timeless, TASK) and [label.label for label in store.labels()] == ["lymphocyte"]


def test_events_are_applied_once_even_when_replayed(store):
    created = {
        "action": "ANNOTATION_CREATED",
        "annotation": annotation(5, "monocyte", "2026-01-01T00:00:01Z", abnormal=True),
        "task": TASK,
    }
    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 5}], "project": {"id": 3}}
    for body in (created, created, {"action": "PROJECT_UPDATED"}, "not json"):
        store.record_event(body if isinstance(body, str) else json.dumps(body))
    assert store.process_events() == 4
    assert store.process_events() == 0
    [label] = store.labels()
    assert label.label == "monocyte" and label.abnormal
    assert store.event_counts() == {"received": 4, "pending": 0, "failed": 1}
    store.record_event(json.dumps(deleted))
    store.record_event(json.dumps(created))  # a late replay of the create after the delete
    store.process_events()
    assert store.labels() == []


def test_annotators_get_names_and_votes_are_per_cell(store):
    store.upsert(annotation(1, "neutrophil", "2026-01-01T00:00:01Z", who=4), TASK, "poll")
    store.upsert(
        annotation(2, "neutrophil", "2026-01-01T00:00:01Z", who=5),
        {**TASK, "data": {**TASK["data"], "task_key": "jtsc:a.bmp@v2", "model_version": "v2"}},
        "poll",
    )
    store.set_annotators({4: "ann4@lab", 5: "ann5@lab"})
    votes = store.votes()
    assert {(v.cell_key, v.annotator) for v in votes} == {("jtsc:a.bmp", "ann4@lab"), ("jtsc:a.bmp", "ann5@lab")}


def test_labels_of_deleted_users_are_votes_of_their_own(store):
    """Label Studio keeps a deleted user's annotations with `completed_by: null`: as a vote of annotator None,
    consensus sorted it against the others' names and raised, and every push, route and export after it failed;
    two deleted users' labels of one cell were one vote."""
    from cytoloop.policy.consensus import consensus

    for ann_id, who, label in ((1, None, "neutrophil"), (2, None, "neutrophil"), (3, 4, "lymphocyte")):
        store.upsert(annotation(ann_id, label, "2026-01-01T00:00:01Z", who=who), TASK, "poll")
    store.set_annotators({4: "ann4@lab"})
    [decided] = consensus(store.votes(), required=3).values()
    assert (
        decided.status == "agreed"
        and decided.label == "neutrophil"
        and decided.votes == {"neutrophil": 2, "lymphocyte": 1}
    )
    assert sorted(decided.annotators) == ["ann4@lab", "deleted user (annotation #1)", "deleted user (annotation #2)"]


def test_outbox_queues_each_task_once(tmp_path):
    outbox = Outbox(tmp_path / "outbox.db")
    tasks = [{"data": {"task_key": f"s:{i}@v1", "site": "s"}} for i in range(3)]
    assert outbox.enqueue(tasks) == 3
    assert outbox.enqueue(tasks) == 0
    assert outbox.known(["s:0@v1", "s:9@v1"]) == {"s:0@v1"}
    outbox.mark_pushed("org1", 1, {"s:0@v1": 10})
    assert [t["data"]["task_key"] for t in outbox.pending()["s"]] == ["s:1@v1", "s:2@v1"]
    assert Outbox(tmp_path / "outbox.db").counts() == {"queued": 3, "pending": 2, "pushed": 1, "failed": 0}  # durable


def _cell_task(i: int) -> dict:
    return {"data": {"task_key": f"s:c{i}@v1", "site": "s", "cell_id": f"c{i}"}}


def test_a_replaced_label_studio_is_sent_every_task_whose_cell_is_not_settled(tmp_path):
    """Tasks the old Label Studio took stayed "pushed" for ever when the lab replaced it, so its unlabelled cells
    were never asked again. A push to another server queues them again, except the cells whose labels agree."""
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.enqueue([_cell_task(i) for i in range(3)])
    outbox.mark_pushed("old", 1, {"s:c0@v1": 10, "s:c1@v1": 11, "s:c2@v1": 12})
    assert outbox.resend_elsewhere("old") == 0 and outbox.pending() == {}  # the same server: nothing to send
    assert outbox.resend_elsewhere("new", settled={"s:c1"}) == 2
    assert [t["data"]["task_key"] for t in outbox.pending()["s"]] == ["s:c0@v1", "s:c2@v1"]
    assert outbox.counts() == {"queued": 3, "pending": 2, "pushed": 1, "failed": 0}
    outbox.mark_pushed("new", 1, {"s:c0@v1": 1, "s:c2@v1": 2})
    assert outbox.resend_elsewhere("new", settled={"s:c1"}) == 0 and outbox.pending() == {}  # once, not each push


def test_an_outbox_of_the_first_format_gets_its_server_from_the_first_push(tmp_path):
    import sqlite3

    from labelstudio import sqlite as stores

    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as db:  # version 1: no server column
        db.execute(
            "CREATE TABLE outbox (task_key TEXT PRIMARY KEY, site TEXT NOT NULL, task TEXT NOT NULL, "
            "queued_at TEXT NOT NULL, project_id INTEGER, task_id INTEGER, pushed_at TEXT, "
            "attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT)"
        )
        db.execute(
            "INSERT INTO outbox VALUES ('s:c0@v1', 's', ?, '2026-01-01', 1, 10, '2026-01-01', 0, NULL)",
            (json.dumps(_cell_task(0)),),
        )
        db.execute("PRAGMA user_version = 1")
    outbox = Outbox(path)
    assert stores.schema_version(path) == 3 and outbox.counts()["pushed"] == 1
    assert outbox.resend_elsewhere("first") == 0  # adopted by the server the first push reaches
    assert outbox.resend_elsewhere("second") == 1


def test_an_import_without_an_answer_has_its_task_watched_for_a_twin_once_pushed(tmp_path):
    """Only a task sent more than once with an answer missing can have a late-committed twin; an import Label
    Studio answered, even with a refusal, is accounted for. An outbox of the second format starts with none in
    doubt."""
    import sqlite3

    from labelstudio import sqlite as stores

    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as db:  # version 2: no sends, no watch
        db.execute(
            "CREATE TABLE outbox (task_key TEXT PRIMARY KEY, site TEXT NOT NULL, task TEXT NOT NULL, "
            "queued_at TEXT NOT NULL, project_id INTEGER, task_id INTEGER, pushed_at TEXT, "
            "attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, server TEXT)"
        )
        db.execute("PRAGMA user_version = 2")
    outbox = Outbox(path)
    assert stores.schema_version(path) == 3
    outbox.enqueue([_cell_task(i) for i in range(3)])
    keys = ["s:c0@v1", "s:c1@v1", "s:c2@v1"]
    outbox.mark_sending(keys)  # no answer (timed out) ...
    outbox.mark_sending(keys[1:])  # ... and sent again; Label Studio refuses c2's second import
    outbox.mark_answered(keys[2:])
    outbox.mark_pushed("org", 7, {"s:c0@v1": 10, "s:c1@v1": 11, "s:c2@v1": 12})
    assert outbox.watched("org") == {7: {"s:c1@v1": 11}} and outbox.watched("other") == {}
    outbox.mark_sending(keys[:1])
    outbox.mark_pushed("org", 7, {"s:c0@v1": 10})  # one import, answered: no twin possible
    assert outbox.watched("org") == {7: {"s:c1@v1": 11}}
    assert outbox.resend_elsewhere("new") == 3 and outbox.watched("org") == {}  # sent again: the old twins moot


def test_label_config_is_generated_from_the_classes():
    xml = build_label_config(["lymphocyte", "neutrophil"])
    root = ET.fromstring(xml)
    values = [c.get("value") for c in root.iter("Choice")]
    assert values == ["lymphocyte", "neutrophil", OTHER, ARTEFACT, ABNORMAL]
    assert root.find("TextArea") is not None
    assert config_classes(xml) == ["lymphocyte", "neutrophil"] and config_classes("<View/>") == []
    with pytest.raises(ValueError, match="reserved"):
        build_label_config(["lymphocyte", OTHER])
    result = prediction_result("lymphocyte") + [
        {"from_name": "comment", "to_name": "image", "type": "textarea", "value": {"text": ["odd nucleus"]}}
    ]
    assert parse_result(result) == ("lymphocyte", False, "odd nucleus")


def test_webhook_checks_the_secret_and_stores_raw_events(store):
    with TestClient(create_app(store, "s3cret", apply_every_s=0.05)) as client:
        body = {
            "action": "ANNOTATION_CREATED",
            "annotation": annotation(9, "neutrophil", "2026-01-01T00:00:01Z"),
            "task": TASK,
        }
        assert client.post("/webhook", json=body).status_code == 401
        assert client.post("/webhook", json=body, headers={SECRET_HEADER: "wrong"}).status_code == 401
        assert client.post("/webhook", json={"no": "action"}, headers={SECRET_HEADER: "s3cret"}).status_code == 422
        response = client.post("/webhook", json=body, headers={SECRET_HEADER: "s3cret"})
        assert response.status_code == 200 and response.json()["action"] == "ANNOTATION_CREATED"
    # leaving the app applies what is still pending
    assert [label.annotation_id for label in store.labels()] == [9]
    assert store.event_counts()["received"] == 1


def test_a_label_event_of_another_shape_is_refused_in_the_request_naming_what_is_wrong(store):
    """Such events were taken (200) and quarantined later, unseen by whoever sent them; an annotation id of 1.9
    was stored as annotation 1, replacing its label. Events that carry no labels are kept unchecked."""
    headers = {SECRET_HEADER: "s3cret"}
    good = annotation(9, "neutrophil", "2026-01-01T00:00:01Z")
    refused = [
        ({"action": "ANNOTATION_CREATED", "task": TASK}, "ANNOTATION_CREATED event: annotation: Field required"),
        ({"action": "ANNOTATION_UPDATED", "annotation": {**good, "id": 1.9}, "task": TASK}, "annotation.id"),
        ({"action": "ANNOTATION_CREATED", "annotation": {**good, "id": True}, "task": TASK}, "annotation.id"),
        ({"action": "ANNOTATIONS_CREATED", "annotation": [good], "task": [{"id": 7}]}, "task.0.data"),
        ({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}, {"id": "abc"}]}, "annotations.1.id"),
    ]
    with TestClient(create_app(store, "s3cret", apply_every_s=0.05)) as client:
        for body, named in refused:
            response = client.post("/webhook", json=body, headers=headers)
            assert response.status_code == 422 and named in response.json()["detail"], response.json()
        assert client.post("/webhook", json={"action": "PROJECT_UPDATED"}, headers=headers).status_code == 200
    assert store.event_counts() == {"received": 1, "pending": 0, "failed": 0}


def test_the_webhook_checks_the_secret_before_the_body_and_caps_its_size(store):
    """FastAPI parsed the body before the route checked the secret: without one, a body that was not JSON got a
    422 describing it, a body of any size was read whole, and /docs and /openapi.json answered anyone."""
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from labelstudio.guard import Guard

    with TestClient(create_app(store, "s3cret", apply_every_s=0.05)) as client:
        headers = {"content-type": "application/json"}
        assert client.post("/webhook", content=b"{not json", headers=headers).status_code == 401
        assert (
            client.post("/webhook", content=b"{not json", headers={**headers, SECRET_HEADER: "s3cret"}).status_code
            == 422
        )
        for path in ("/docs", "/openapi.json"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers={SECRET_HEADER: "s3cret"}).status_code == 404  # not served at all
        assert client.get("/health").status_code == 200  # the stack's health check needs no secret
        huge = client.post("/webhook", headers={**headers, SECRET_HEADER: "s3cret", "content-length": str(64 << 20)})
        assert huge.status_code == 413
    assert store.event_counts()["received"] == 0

    async def echo(request):
        return PlainTextResponse(str(len(await request.body())))

    guarded = Guard(Starlette(routes=[Route("/", echo, methods=["POST"])]), lambda h: True, "no", max_body=1000)
    read: list[int] = []

    def stream(chunks: int):  # a chunked body with no length declared, 400 bytes a chunk
        async def receive():
            read.append(1)
            return {"type": "http.request", "body": b"x" * 400, "more_body": len(read) < chunks}

        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
        asyncio.run(guarded(scope, receive, send))
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    assert stream(2) == (200, b"800")  # under the cap: the app gets the whole body, as sent
    read.clear()
    assert stream(1000)[0] == 413 and len(read) == 3  # refused on the chunk that crossed 1,000 bytes


def test_the_receiver_takes_no_event_before_it_knows_which_label_studio_sends_it(tmp_path, clean_env):
    """`review serve` checked an event's `?server=` only once its poll had asked Label Studio, a minute after it
    started, and at the start of every round (and while Label Studio was unreachable) checked nothing: an event
    naming any server was taken and filed under it for good. The real receiver, its Label Studio stopped: an
    event naming a server is refused (503; the poll brings its labels once Label Studio is back)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    stopped, receiver = ports  # nothing listens on the first: Label Studio is down
    env = {
        **os.environ,
        "CYTOLOOP_HOME": str(tmp_path / "home"),
        "CYTOLOOP_STACK__LABEL_STUDIO_PORT": str(stopped),
        "CYTOLOOP_STACK__ADMIN_TOKEN": "a-token-for-a-server-that-is-down",
        "CYTOLOOP_REVIEW__WEBHOOK_PORT": str(receiver),
        "CYTOLOOP_REVIEW__WEBHOOK_SECRET": "s3cret",
    }
    serving = subprocess.Popen([sys.executable, "-m", "ops.cli", "review", "serve"], env=env, cwd=Path.cwd())
    try:
        url = f"http://127.0.0.1:{receiver}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert serving.poll() is None and time.monotonic() < deadline, "the receiver did not start"
            time.sleep(0.2)
        body = {"action": "ANNOTATION_CREATED", "annotation": annotation(9, "neutrophil", "2026-01-01T00:00:01Z")}
        sent = httpx.post(
            url + "/webhook?server=anyone", json={**body, "task": TASK}, headers={SECRET_HEADER: "s3cret"}, timeout=10
        )
        assert sent.status_code == 503 and "the poll brings its labels" in sent.json()["detail"], sent.text
    finally:
        serving.terminate()
        serving.wait(timeout=30)
    assert LabelStore(tmp_path / "home" / "review" / "labels.db").event_counts()["received"] == 0


def test_the_webhook_refuses_events_naming_another_label_studio(store):
    """The server identity is in the webhook's URL, outside the secret: a label filed under a server no poll
    reconciles (never checked, never retracted) would count as a vote for good."""
    body = {"action": "ANNOTATION_CREATED", "annotation": annotation(9, "neutrophil", "2026-01-01T00:00:01Z")}
    with TestClient(create_app(store, "s3cret", apply_every_s=0.05, known_server=lambda: "srv-a")) as client:
        headers = {SECRET_HEADER: "s3cret"}
        assert client.post("/webhook?server=bogus", json={**body, "task": TASK}, headers=headers).status_code == 403
        assert client.post("/webhook?server=srv-a", json={**body, "task": TASK}, headers=headers).status_code == 200
    assert store.event_counts()["received"] == 1


def test_applied_events_give_up_their_bodies_after_a_week_and_the_queue_is_read_by_an_index(store):
    """Every webhook body (Label Studio sends the whole project with each) stayed for ever, and every idle tick of
    the receiver scanned them all for the next one to apply: 30,000 events were 184 MB and 20 ms a tick. An applied
    event's body is emptied a week on; a quarantined one keeps its body for a person, a pending one is untouched."""
    from datetime import UTC, datetime, timedelta

    from labelstudio import sqlite
    from labelstudio.store import EVENT_BODY_DAYS

    good = {"action": "ANNOTATION_CREATED", "annotation": annotation(21, "monocyte", "2026-01-01T00:00:01Z")}
    store.record_event(json.dumps({**good, "task": TASK}))
    store.record_event("not json")  # quarantined
    assert store.process_events() == 2
    store.record_event(json.dumps({**good, "task": TASK}))  # waiting
    assert store.forget_applied_bodies(datetime.now(UTC) - timedelta(days=EVENT_BODY_DAYS)) == 0  # too recent
    assert store.forget_applied_bodies(datetime.now(UTC) + timedelta(seconds=1)) == 1
    with sqlite.connect(store.path) as db:
        bodies = [row["body"] for row in db.execute("SELECT body FROM events ORDER BY id")]
        plan = " ".join(
            row["detail"]
            for row in db.execute(
                "EXPLAIN QUERY PLAN SELECT id, body, server FROM events WHERE processed_at IS NULL ORDER BY id LIMIT 1"
            )
        )
    assert bodies[0] == "" and bodies[1] == "not json" and bodies[2].startswith("{")
    assert "events_pending" in plan, plan
    assert store.event_counts() == {"received": 3, "pending": 1, "failed": 1}
    assert store.process_events() == 1 and [label.annotation_id for label in store.labels()] == [21]


def test_a_bad_event_is_quarantined_and_every_later_label_still_arrives(store):
    """An event of another shape (an AttributeError deep in the upsert) or one the database refuses (a value it
    cannot bind) used to stay first in the queue and fail every later processing run. Of a bulk event, the good
    annotations are kept (they were all left out until the next poll) and only the bad one is quarantined; a
    non-integer id (1.9 was read as annotation 1, and replaced its label) and an annotation whose task the event
    lacks are such bad ones."""
    good = annotation(11, "neutrophil", "2026-01-01T00:00:01Z")
    half_good = {
        "action": "ANNOTATIONS_CREATED",  # the first annotation applies, the others fail
        "annotation": [
            annotation(12, "monocyte", "2026-01-01T00:00:01Z"),
            {**good, "id": 13, "result": "oops"},
            annotation(11.9, "lymphocyte", "2026-01-02T00:00:00Z"),  # newer: as 11, it replaced its label
            {**good, "id": 15, "task": 99},
        ],
        "task": [TASK],
    }
    unbindable = {"action": "ANNOTATION_CREATED", "annotation": {**good, "id": 14, "project": {"id": 3}}, "task": TASK}
    for event in (half_good, unbindable, {"action": "ANNOTATION_CREATED", "annotation": good, "task": TASK}):
        store.record_event(json.dumps(event))
    assert store.process_events() == 3
    assert [(label.annotation_id, label.label) for label in store.labels()] == [(11, "neutrophil"), (12, "monocyte")]
    assert store.event_counts() == {"received": 3, "pending": 0, "failed": 2}
    errors = [error for _, _, error in store.quarantined()]
    assert errors[0].startswith("annotation 1 of 1: NotALabel: annotation 14: its project is not an id: {'id': 3}")
    assert errors[1].startswith("annotation 2 of 4: NotALabel: annotation 13: its result is a str, not a list")
    assert "annotation 3 of 4: ValueError: an annotation id must be an integer, got 11.9" in errors[1]
    assert "annotation 4 of 4: ValueError: its task 99 is not among the event's tasks" in errors[1]


_FIRST_FORMAT = """
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, received_at TEXT NOT NULL, body TEXT NOT NULL,
    processed_at TEXT, error TEXT);
CREATE TABLE annotations (annotation_id INTEGER PRIMARY KEY, project_id INTEGER, task_id INTEGER, task_key TEXT,
    cell_id TEXT, sample_id TEXT, site TEXT, domain TEXT, image_path TEXT, model_version TEXT, model_label TEXT,
    annotator_id INTEGER, label TEXT, abnormal INTEGER NOT NULL DEFAULT 0, comment TEXT NOT NULL DEFAULT '',
    was_cancelled INTEGER NOT NULL DEFAULT 0, created_at TEXT, updated_at TEXT, source TEXT, stored_at TEXT NOT NULL,
    retracted_at TEXT);
CREATE INDEX annotations_project ON annotations (project_id);
CREATE TABLE annotators (annotator_id INTEGER PRIMARY KEY, email TEXT NOT NULL);
INSERT INTO annotations (annotation_id, project_id, task_key, cell_id, site, annotator_id, label, updated_at, stored_at)
    VALUES (1, 3, 'jtsc:a.bmp@v1', 'a.bmp', 'jtsc', 4, 'neutrophil', '2026-01-01', '2026-01-01');
INSERT INTO annotators VALUES (4, 'ann4@lab');
"""


def test_a_store_of_the_first_format_is_migrated_and_adopted_by_its_server(tmp_path):
    """Labels stored before server identities keep their votes through the upgrade, and the first server that
    syncs takes them over (so its later polls account for them); another server's ids never touch them."""
    import sqlite3

    path = tmp_path / "labels.db"
    with sqlite3.connect(path) as db:
        db.executescript(_FIRST_FORMAT)
    store = LabelStore(path)
    [vote] = store.votes()
    assert (vote.cell_key, vote.annotator, vote.label) == ("jtsc:a.bmp", "ann4@lab", "neutrophil")
    assert store.adopt("org1@A") == 1 and store.live_ids(3, "org1@A") == {1} and store.live_ids(3) == set()
    assert [v.annotator for v in store.votes()] == ["ann4@lab"]
    assert store.upsert(annotation(1, "lymphocyte", "2026-02-01T00:00:00Z", who=4), TASK, "poll", "org1@B")
    assert sorted(v.label for v in store.votes()) == ["lymphocyte", "neutrophil"]  # two servers, two labels
    assert LabelStore(path).live_ids(3, "org1@A") == {1}  # opening it again migrates nothing twice


def test_the_labelling_view_has_hotkeys_controls_a_fixed_size_and_room_for_a_new_class(tmp_path):
    """Keys 1-9 for the classes, zoom/brightness/contrast, one unsmoothed display size; an annotator can name a
    class the model lacks, the consensus counts it, and the export keeps it apart for a later model."""
    from labelstudio.export import export_manifest
    from labelstudio.label_config import DISPLAY_PX, NEW_CLASS_FROM

    classes = [f"class{i}" for i in range(10)]
    root = ET.fromstring(build_label_config(classes))
    keys = {c.get("value"): c.get("hotkey") for c in root.iter("Choice")}
    assert [keys[f"class{i}"] for i in range(9)] == [str(i) for i in range(1, 10)] and keys["class9"] is None
    assert (keys[OTHER], keys[ARTEFACT]) == ("u", "a")
    image = root.find("Image")
    assert image.get("width") == f"{DISPLAY_PX}px" and image.get("smoothing") == "false"
    assert all(image.get(c) == "true" for c in ("zoomControl", "brightnessControl", "contrastControl"))
    # the free class name shows only once "other" is chosen (Label Studio honours visibleWhen on a View, not on a
    # TextArea: the browser test sees it hidden and shown)
    [shown_when] = [v for v in root.iter("View") if v.find("TextArea") is not None and v.get("visibleWhen")]
    assert shown_when.get("visibleWhen") == "choice-selected" and shown_when.get("whenChoiceValue") == OTHER
    assert shown_when.find("TextArea").get("name") == NEW_CLASS_FROM

    def other(name: str) -> list[dict]:
        return prediction_result(OTHER) + [
            {"from_name": NEW_CLASS_FROM, "to_name": "image", "type": "textarea", "value": {"text": [name]}}
        ]

    assert parse_result(other("  Hairy  Cell "))[0] == "new:hairy_cell"
    assert parse_result(prediction_result(OTHER))[0] == OTHER  # unnamed: still just "other"
    store = LabelStore(tmp_path / "labels.db")
    for i, (result, who) in enumerate([(other("hairy cell"), 1), (other("Hairy cell"), 2)]):
        ann = {"id": i + 1, "task": 7, "completed_by": who, "result": result, "updated_at": "2026-01-01T00:00:01Z"}
        store.upsert(ann, TASK, "poll")
    report = export_manifest(store, tmp_path / "labels.csv", labels_required=2)
    assert report["exported"] == 0 and report["new_classes"]["cells"] == {"hairy_cell": 1}
    rows = (tmp_path / "labels.new-classes.csv").read_text().splitlines()
    assert rows[1].split(",")[:2] == ["/x/a.bmp", "hairy_cell"]
    # one annotator changes their mind: no consensus on a new class, and the earlier file must not outlive it
    ann = {"id": 2, "task": 7, "completed_by": 2, "result": prediction_result("class1"), "updated_at": "2026-01-02"}
    store.upsert(ann, TASK, "poll")
    report = export_manifest(store, tmp_path / "labels.csv", labels_required=2)
    assert "new_classes" not in report and not (tmp_path / "labels.new-classes.csv").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_an_image_path_outside_the_images_root_stays_out_of_the_export(tmp_path, monkeypatch):
    """Task data comes back from Label Studio as its members left it: a task edited to name another file would
    have made training read it. A relative path was checked against the working folder (here /, so x/b.bmp
    passed as /x/b.bmp) and read by training from the manifest's folder: another file."""
    from labelstudio.export import export_manifest

    monkeypatch.chdir("/")
    store = LabelStore(tmp_path / "labels.db")
    for task_id, path in ((7, "/x/a.bmp"), (8, "/etc/passwd"), (9, "x/b.bmp")):
        task = {**TASK, "id": task_id, "data": {**TASK["data"], "cell_id": f"c{task_id}", "image_path": path}}
        for who in (1, 2):
            ann = {"id": task_id * 10 + who, "task": task_id, "completed_by": who, "updated_at": "2026-01-01T00:00:01Z"}
            store.upsert({**ann, "result": prediction_result("class1")}, task, "poll")
    report = export_manifest(store, tmp_path / "labels.csv", labels_required=2, images_root=Path("/x"))
    assert report["exported"] == 1
    assert report["left_out"] == {"image outside images_root": 1, "image path not absolute": 1}
    assert "/etc/passwd" not in (tmp_path / "labels.csv").read_text()
    assert export_manifest(store, tmp_path / "all.csv", labels_required=2)["exported"] == 2  # no root: no check


def test_two_cells_of_one_image_file_make_one_row_or_none_and_the_manifest_trains(tmp_path):
    """One crop routed for two sites (or a task edited to name another's image) was two rows of one file, and
    `read_manifest` refused the whole manifest: every later export failed to train. Agreeing, they are one row;
    disagreeing, neither goes in."""
    from cytoloop.data.records import read_manifest
    from labelstudio.export import export_manifest

    (tmp_path / "x").mkdir()
    for name in ("a.bmp", "b.bmp"):
        (tmp_path / "x" / name).write_bytes(b"BM")
    store = LabelStore(tmp_path / "labels.db")
    cells = [  # (task, site, image, label)
        (7, "north", "a.bmp", "class1"),
        (8, "south", "a.bmp", "class1"),
        (9, "north", "b.bmp", "class1"),
        (10, "south", "b.bmp", "class2"),
    ]
    for task_id, site, name, label in cells:
        data = {**TASK["data"], "cell_id": name, "site": site, "image_path": str(tmp_path / "x" / name)}
        task = {**TASK, "id": task_id, "data": {**data, "task_key": f"{site}:{name}@v1"}}
        for who in (1, 2):
            ann = {"id": task_id * 10 + who, "task": task_id, "completed_by": who, "updated_at": "2026-01-01T00:00:01Z"}
            store.upsert({**ann, "result": prediction_result(label)}, task, "poll")
    out = tmp_path / "labels.csv"
    report = export_manifest(store, out, labels_required=2, images_root=tmp_path / "x")
    assert report["exported"] == 1
    assert report["left_out"] == {"same image as another cell": 1, "same image, other label": 2}
    [record] = read_manifest(out)
    assert Path(record.path).name == "a.bmp" and record.label == "class1"


def test_the_stores_record_their_schema_version_and_refuse_a_newer_one(tmp_path):
    import sqlite3

    from labelstudio import sqlite as stores
    from labelstudio.store import SCHEMA_VERSION

    LabelStore(tmp_path / "labels.db")
    Outbox(tmp_path / "outbox.db")
    assert stores.schema_version(tmp_path / "labels.db") == SCHEMA_VERSION == 2
    assert stores.schema_version(tmp_path / "outbox.db") == 3
    with sqlite3.connect(tmp_path / "labels.db") as db:
        db.execute("PRAGMA user_version = 9")  # a newer CytoLoop wrote it
    with pytest.raises(stores.SchemaTooNew, match="schema version 9, newer than this CytoLoop's 2"):
        LabelStore(tmp_path / "labels.db")


def test_the_webhook_keeps_applying_events_after_the_database_was_unusable(store, tmp_path, caplog):
    """The label database moved away for a moment (a restore, a full disk): the apply thread used to die on the
    first error, and every later event then waited for the next poll while /health said ok."""
    import time

    body = {"action": "ANNOTATION_CREATED", "annotation": annotation(21, "neutrophil", "2026-01-01T00:00:01Z")}
    with TestClient(create_app(store, "s3cret", apply_every_s=0.05)) as client:
        aside = tmp_path / "aside.db"
        store.path.rename(aside)
        deadline = time.monotonic() + 10
        while "applying label events failed" not in caplog.text:  # the thread's runs fail: the file has no tables
            assert time.monotonic() < deadline, "the apply thread never ran into the missing database"
            time.sleep(0.02)
        store.path.unlink(missing_ok=True)
        aside.rename(store.path)
        client.post("/webhook", json={**body, "task": TASK}, headers={SECRET_HEADER: "s3cret"})
        deadline = time.monotonic() + 5
        while not store.labels() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [label.annotation_id for label in store.labels()] == [21]  # applied by the thread, not on exit


def test_a_webhook_of_the_old_url_does_not_count_a_label_twice(store):
    """A webhook registered before server identities (its URL has no ?server=) sends an update of an annotation
    the poll already stored under the server: the legacy copy used to vote beside it, one hematologist's label
    counted as two annotators' agreement."""
    store.set_annotators({4: "alice@lab"}, "org1@A")
    assert store.upsert(annotation(1, "neutrophil", "2026-01-01T00:00:01Z", who=4), TASK, "poll", "org1@A")
    store.record_event(
        json.dumps(
            {
                "action": "ANNOTATION_UPDATED",
                "annotation": annotation(1, "neutrophil", "2026-01-01T00:00:02Z", who=4),
                "task": TASK,
            }
        )
    )
    assert store.process_events() == 1
    assert [(v.annotator, v.label) for v in store.votes()] == [("alice@lab", "neutrophil")]
    # a recreated server's annotation 9 is another annotation than a legacy row 9 of another task: both count
    other_task = {**TASK, "id": 8, "data": {**TASK["data"], "task_key": "jtsc:b.bmp@v1", "cell_id": "b.bmp"}}
    store.record_event(
        json.dumps(
            {
                "action": "ANNOTATION_CREATED",
                "annotation": annotation(9, "monocyte", "2026-01-01T00:00:01Z", who=4),
                "task": TASK,
            }
        )
    )
    store.process_events()
    assert store.upsert(annotation(9, "eosinophil", "2026-01-01T00:00:01Z", who=4), other_task, "poll", "org1@B")
    assert sorted(v.label for v in store.votes()) == ["eosinophil", "monocyte", "neutrophil"]


def test_an_annotation_of_a_task_cytoloop_did_not_push_is_not_a_label(store):
    """Tasks imported into a project by hand name no cell: their annotations were stored as votes on one fake
    cell ':' and exported as a row with an empty path."""
    foreign = {"id": 8, "project": 3, "data": {"image": "/data/upload/x.png"}}
    assert not store.upsert(annotation(2, "neutrophil", "2026-01-01T00:00:01Z"), foreign, "poll")
    store.record_event(
        json.dumps(
            {
                "action": "ANNOTATION_CREATED",
                "annotation": annotation(3, "monocyte", "2026-01-01T00:00:01Z"),
                "task": foreign,
            }
        )
    )
    assert store.process_events() == 1
    assert store.labels() == [] and store.event_counts()["failed"] == 1
    [(_, _, error)] = store.quarantined()
    assert "its task 8 names no cell_id" in error


def test_an_annotation_of_another_shape_is_skipped_and_the_poll_goes_on(store, caplog):
    """Label Studio checks only that a result is a list: a region that is no object raised an AttributeError out of
    the poll, which then stopped at that annotation every period (later tasks and projects never read); choices
    given as a string were stored as its first letter, the class "n"."""
    from labelstudio.label_config import CLASS_FROM

    shapes = {
        2: [None],
        3: [{"from_name": CLASS_FROM, "value": "neutrophil"}],
        4: [{"from_name": CLASS_FROM, "to_name": "image", "type": "choices", "value": {"choices": "neutrophil"}}],
        5: [{"from_name": CLASS_FROM, "to_name": "image", "type": "choices", "value": {"choices": [{"a": 1}]}}],
        6: {"from_name": CLASS_FROM},
    }
    for ann_id, result in shapes.items():
        with caplog.at_level("WARNING", logger="labelstudio.store"):
            assert (
                store.upsert({**annotation(ann_id, "x", "2026-01-01T00:00:01Z"), "result": result}, TASK, "poll")
                is False
            )
        assert f"annotation {ann_id}: " in caplog.text
    assert store.upsert(annotation(7, "neutrophil", "2026-01-01T00:00:01Z"), TASK, "poll")  # the next one is stored
    assert [(label.annotation_id, label.label) for label in store.labels()] == [(7, "neutrophil")]
    store.record_event(
        json.dumps(
            {
                "action": "ANNOTATION_CREATED",
                "annotation": {**annotation(8, "x", "2026"), "result": [None]},
                "task": TASK,
            }
        )
    )
    assert store.process_events() == 1 and store.event_counts()["failed"] == 1  # an event: quarantined, named
    [(_, _, error)] = store.quarantined()
    assert "annotation 8: result region 1 is not a region object" in error


def test_restoring_an_old_row_of_a_task_naming_no_cell_leaves_it_retracted(store):
    """A row stored before such tasks were refused, retracted, then listed again: `restore` raised and every sync
    failed from then on."""
    import sqlite3

    foreign = {"id": 8, "project": 3, "data": {"image": "/data/upload/x.png"}}
    with sqlite3.connect(store.path) as db:
        db.execute(
            "INSERT INTO annotations (server, annotation_id, project_id, task_key, cell_id, stored_at, retracted_at) "
            "VALUES ('s', 31, 3, '', '', '2026-01-01', '2026-01-02')"
        )
    assert store.restore(annotation(31, "neutrophil", "2026-01-03T00:00:00Z"), foreign, "s") is False
    assert store.is_retracted(31, "s")


def test_an_export_with_no_consensus_leaves_an_earlier_manifest_as_it_was(tmp_path):
    """A store without consensus labels (a wrong home, or the empty one any review command creates) replaced a
    manifest of earlier labels with a header alone; it is refused now, naming the file, which keeps its lines."""
    from cytoloop.errors import UsageError
    from labelstudio.export import export_manifest

    store = LabelStore(tmp_path / "labels.db")
    earlier = tmp_path / "labels.csv"
    earlier.write_text("path,label\n/x/a.bmp,class1\n/x/b.bmp,class2\n")
    with pytest.raises(UsageError, match="labels.csv: no consensus labels to export .* the 2 lines"):
        export_manifest(store, earlier, labels_required=2)
    assert earlier.read_text() == "path,label\n/x/a.bmp,class1\n/x/b.bmp,class2\n"
    assert export_manifest(store, tmp_path / "new.csv", labels_required=2)["exported"] == 0  # nothing to lose
