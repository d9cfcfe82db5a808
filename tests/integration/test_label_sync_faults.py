"""Faults of the review loop against a real Label Studio (the session server of conftest.py), each made to
happen for real in a project of its own.

Labels are retracted only on evidence: a label stored while a poll lists the project, a task deleted while a poll
pages through it, a label wrongly retracted earlier (without the fix the first two retract a live label for good
and the third never brings it back). Pushes: a task Label Studio refuses does not hold back the others (it used
to abort the whole push, for ever), two pushes at once import each task once (they used to import it twice), and
a Label Studio that replaces another gets the open tasks the old one took (they used to stay with the old one).
"""

from __future__ import annotations

import itertools

import pytest

from labelstudio.client import server_identity
from labelstudio.label_config import prediction_result

pytestmark = pytest.mark.integration

CLASSES = ["lymphocyte", "monocyte", "neutrophil"]
_names = itertools.count(1)


@pytest.fixture
def project(label_studio, tmp_path):
    """A fresh project with six tasks, an admin client, and an empty label store."""
    from label_studio_sdk import LabelStudio

    from labelstudio.bootstrap import ensure_project
    from labelstudio.store import LabelStore

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    project_id = ensure_project(client, f"sync faults {next(_names)}", CLASSES, labels_required=1)
    tasks = [{"data": {"image": f"/data/cell{i}.png", "site": "lab", "cell_id": f"cell{i}.png"}} for i in range(6)]
    client.projects.import_tasks(id=project_id, request=tasks)
    task_ids = sorted(t.id for t in client.tasks.list(project=project_id))
    return client, project_id, task_ids, LabelStore(tmp_path / "labels.db")


def label(client, task_id: int, name: str) -> int:
    return client.annotations.create(id=task_id, result=prediction_result(name)).id


def live(store) -> set[int]:
    return {stored.annotation_id for stored in store.labels()}


def test_a_label_stored_while_a_poll_lists_the_project_stays_live(project):
    """The webhook path stores a new annotation after the poll fetched its listing: the listing does not show
    it, and a poll that retracted whatever it did not list would retract it for good."""
    from labelstudio.sync import sync

    client, project_id, task_ids, store = project
    first = label(client, task_ids[0], "neutrophil")
    sync(client, store, [project_id], server_identity(client))
    assert live(store) == {first}
    arrived: list[int] = []

    def webhook_meanwhile(n: int) -> None:
        if n == 1:  # the listing is in hand; an annotator labels a task it has already passed
            new = client.annotations.create(id=task_ids[0], result=prediction_result("lymphocyte"))
            store.upsert(
                new.model_dump(mode="json"),
                {"id": task_ids[0], "project": project_id, "data": {"site": "lab", "cell_id": "cell0.png"}},
                "webhook",
                server_identity(client),
            )
            arrived.append(new.id)

    report = sync(client, store, [project_id], server_identity(client), on_annotation=webhook_meanwhile)
    assert arrived and live(store) == {first, arrived[0]}
    assert report.retracted == 0
    assert (
        sync(client, store, [project_id], server_identity(client)).retracted == 0
    )  # and the next poll, which lists it, agrees


def test_a_task_deleted_while_a_poll_pages_retracts_only_its_own_labels(project):
    """Pages of two tasks: deleting a task of the first page while it is being read shifts the next task onto
    that page, so the listing never shows that task. Its label must stay; the deleted task's label goes (on the
    next poll: this one still had it in the page it was reading)."""
    from labelstudio.sync import sync

    client, project_id, task_ids, store = project
    labels = {task_id: label(client, task_id, "monocyte") for task_id in task_ids}
    sync(client, store, [project_id], server_identity(client), page_size=2)
    assert live(store) == set(labels.values())

    def delete_meanwhile(n: int) -> None:
        if n == 1:
            client.tasks.delete(id=task_ids[1])  # on the page being read

    report = sync(client, store, [project_id], server_identity(client), on_annotation=delete_meanwhile, page_size=2)
    assert report.seen == 5  # the third task slid onto the first page: its label was never listed ...
    assert live(store) == set(labels.values()) and report.retracted == 0  # ... and is not retracted
    again = sync(client, store, [project_id], server_identity(client), page_size=2)
    assert again.retracted == 1 and live(store) == {a for t, a in labels.items() if t != task_ids[1]}


def test_a_label_retracted_by_mistake_comes_back(project):
    from labelstudio.sync import sync

    client, project_id, task_ids, store = project
    kept = label(client, task_ids[2], "lymphocyte")
    sync(client, store, [project_id], server_identity(client))
    store.retract(kept, project_id, server_identity(client))  # what a poll that trusted its listing did before
    assert live(store) == set()
    report = sync(client, store, [project_id], server_identity(client))
    assert report.restored == 1 and live(store) == {kept}
    [stored] = store.labels()
    assert stored.label == "lymphocyte"
    client.annotations.delete(id=kept)
    assert (
        sync(client, store, [project_id], server_identity(client)).retracted == 1 and live(store) == set()
    )  # a real delete still goes


def test_an_annotation_label_studio_fails_to_check_holds_back_no_other_project(project, label_studio):
    """Label Studio answers 500 when the poll asks it directly about one stored label its listing lacked: the poll
    raised there, so every later project went unlisted, its new labels never back by poll (for good, while Label
    Studio kept failing on that one annotation). Now that label is left as it was and counted unchecked, the next
    project's labels come in, and a sync once Label Studio answers retracts it."""
    from label_studio_sdk import LabelStudio

    from labelstudio.bootstrap import ensure_project
    from labelstudio.sync import sync
    from tests.faults import FailingServer

    client, first_project, task_ids, store = project
    server = server_identity(client)
    gone = label(client, task_ids[0], "neutrophil")
    sync(client, store, [first_project], server)
    client.annotations.delete(id=gone)  # the listing lacks it: the poll asks for it directly
    second_project = ensure_project(client, f"sync faults {next(_names)}", CLASSES, labels_required=1)
    client.projects.import_tasks(id=second_project, request=[{"data": {"image": "/data/c.png", "cell_id": "c.png"}}])
    [task] = client.tasks.list(project=second_project)
    later = label(client, task.id, "monocyte")
    asked = f"/api/annotations/{gone}"
    front = FailingServer(label_studio.url, lambda method, path: path.split("?")[0].rstrip("/") == asked)
    try:
        front.failing = True
        through = LabelStudio(base_url=front.url, api_key=label_studio.token)
        report = sync(through, store, [first_project, second_project], server)
        assert report.unchecked == 1 and report.retracted == 0 and live(store) == {gone, later}
        front.failing = False
        assert sync(through, store, [first_project, second_project], server).retracted == 1
        assert live(store) == {later}
    finally:
        front.close()


def test_a_deleted_project_s_labels_are_retracted_and_a_renamed_one_s_still_read(project):
    """An admin deletes a project (a trial round's, with test annotators): the poll read only the projects named
    to it, so the deleted one's labels stayed live votes for good, went into training and kept their cells from
    being asked again. Now they are retracted as Label Studio confirms each gone; a project renamed out of the
    title template keeps its labels, and changes made in it still come back."""
    from labelstudio.bootstrap import ensure_project
    from labelstudio.sync import sync

    client, kept_project, task_ids, store = project
    server = server_identity(client)
    kept = label(client, task_ids[0], "neutrophil")
    trial = ensure_project(client, f"sync faults {next(_names)}", CLASSES, labels_required=1)
    client.projects.import_tasks(id=trial, request=[{"data": {"image": "/data/t.png", "cell_id": "t.png"}}])
    [trial_task] = client.tasks.list(project=trial)
    trial_label = label(client, trial_task.id, "monocyte")
    sync(client, store, [kept_project, trial], server)
    assert live(store) == {kept, trial_label}
    client.projects.update(id=kept_project, title=f"archived {next(_names)}")  # out of the template: not named
    client.annotations.update(id=kept, result=prediction_result("lymphocyte"))
    client.projects.delete(id=trial)
    report = sync(client, store, [], server)
    assert report.retracted == 1 and live(store) == {kept}
    assert [s.label for s in store.labels()] == ["lymphocyte"]


def test_a_recreated_label_studio_neither_overwrites_nor_retracts_the_old_ones_labels(label_studio, tmp_path):
    """The lab recreates Label Studio (a new server, or a migration): its project and annotation ids start again
    at 1. Labels keyed by those ids alone were overwritten by the new server's annotation 1 and retracted by its
    first poll (the new server answers 404 for the old ids). Keyed by the server's identity, both servers'
    labels stay, each once."""
    from labelstudio.bootstrap import ensure_project
    from labelstudio.store import LabelStore
    from labelstudio.sync import sync

    store = LabelStore(tmp_path / "labels.db")

    def fresh_server(name: str):
        return _fresh_server(label_studio, tmp_path / name)

    def label_cells(client, cells: list[str], name: str) -> tuple[int, list[int]]:
        project_id = ensure_project(client, "recreated", CLASSES, labels_required=1)
        client.projects.import_tasks(
            id=project_id, request=[{"data": {"image": f"/data/{c}", "site": "lab", "cell_id": c}} for c in cells]
        )
        return project_id, [label(client, t.id, name) for t in client.tasks.list(project=project_id)]

    old_stack, old = fresh_server("old")
    try:
        old_project, old_ids = label_cells(old, ["a.png", "b.png", "c.png"], "neutrophil")
        old_server = server_identity(old)
        sync(old, store, [old_project], old_server)
    finally:
        old_stack.down()  # the old server is gone for good
    new_stack, new = fresh_server("new")
    try:
        new_project, new_ids = label_cells(new, ["d.png"], "lymphocyte")
        assert (new_project, new_ids[0]) == (old_project, old_ids[0])  # the very ids the old server used
        assert server_identity(new) != old_server
        report = sync(new, store, [new_project], server_identity(new))
    finally:
        new_stack.down()
    assert report.retracted == 0
    labels = sorted((stored.cell_id, stored.label) for stored in store.labels())
    assert labels == [
        ("a.png", "neutrophil"),
        ("b.png", "neutrophil"),
        ("c.png", "neutrophil"),
        ("d.png", "lymphocyte"),
    ]


def _fresh_server(label_studio, home):
    """Another real Label Studio (its own home, data and port) with the session's settings: (its stack, a client)."""
    from label_studio_sdk import LabelStudio

    from ops.stack import Stack, label_studio_url, stack_secrets
    from tests.integration.conftest import free_port

    stack_settings = label_studio.settings.stack.model_copy(update={"label_studio_port": free_port()})
    settings = label_studio.settings.model_copy(update={"home": home, "stack": stack_settings})
    stack = Stack(settings)
    stack.up(only=["label-studio"])
    return stack, LabelStudio(base_url=label_studio_url(settings), api_key=stack_secrets(settings)["admin_token"])


def test_tasks_a_replaced_label_studio_took_are_sent_to_the_new_one(label_studio, tmp_path):
    """The lab replaces its Label Studio (a new server, or one recreated without its database). The outbox used to
    keep every task the old server took as pushed, so cells nobody had labelled there were never asked again.
    A push now knows which server took each task: the new server gets every task whose cell has no consensus,
    once; a cell whose labels already agree is not asked again."""
    from labelstudio.outbox import Outbox
    from labelstudio.push import push_outbox

    outbox = Outbox(tmp_path / "outbox.db")
    outbox.enqueue([_task("west", i) for i in range(4)])
    old_stack, old = _fresh_server(label_studio, tmp_path / "old")
    try:
        ensure, _ = _site_projects(old)
        assert push_outbox(old, outbox, ensure, batch=10).pushed == 4
    finally:
        old_stack.down()  # replaced: its projects and tasks are gone with it
    settled = {"west:cell1.png"}  # labelled on the old server, its labels agree (the label store kept them)
    new_stack, new = _fresh_server(label_studio, tmp_path / "new")
    try:
        ensure, projects = _site_projects(new)
        ensure("west", CLASSES)  # the site's project on the new server, whether or not a task reaches it
        first = push_outbox(new, outbox, ensure, batch=10, settled=settled)
        second = push_outbox(new, outbox, ensure, batch=10, settled=settled)
        keys = sorted(t.data["task_key"] for t in new.tasks.list(project=projects["west"], fields="task_only"))
    finally:
        new_stack.down()
    assert (first.resent, first.pushed, first.pending, first.error) == (3, 3, 0, None)
    assert (second.resent, second.pushed) == (0, 0)
    assert keys == ["west:cell0.png@v1", "west:cell2.png@v1", "west:cell3.png@v1"]


def _task(site: str, i: int, bad: bool = False) -> dict:
    data = {
        "task_key": f"{site}:cell{i}.png@v1",
        "site": site,
        "cell_id": f"cell{i}.png",
        "classes": CLASSES,
        "image": f"/data/cell{i}.png",
    }
    if bad:  # no image: Label Studio refuses the task (HTTP 400, validation error)
        data["image"] = None
    return {"data": data}


def _site_projects(client):
    from labelstudio.bootstrap import ensure_project

    made: dict[str, int] = {}

    def ensure(site: str, classes: list[str]) -> int:
        if site not in made:
            made[site] = ensure_project(client, f"push faults {next(_names)} {site}", classes, labels_required=1)
        return made[site]

    return ensure, made


def test_a_task_label_studio_refuses_does_not_hold_back_the_others(label_studio, tmp_path):
    from label_studio_sdk import LabelStudio

    from labelstudio.outbox import MAX_ATTEMPTS, Outbox
    from labelstudio.push import project_task_keys, push_outbox

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.enqueue([_task("north", 0), _task("north", 1, bad=True), _task("north", 2), _task("south", 3)])
    ensure, projects = _site_projects(client)
    report = push_outbox(client, outbox, ensure, batch=10)
    assert (report.pushed, report.failed, report.pending, report.error) == (3, 1, 1, None)
    assert set(project_task_keys(client, projects["north"])) == {"north:cell0.png@v1", "north:cell2.png@v1"}
    [(key, attempts, error)] = outbox.failures()
    assert key == "north:cell1.png@v1" and attempts == 1 and error
    for _ in range(MAX_ATTEMPTS - 1):
        push_outbox(client, outbox, ensure, batch=10)
    assert outbox.counts()["failed"] == 1 and outbox.pending() == {}  # parked for a person, not retried for ever
    assert len(project_task_keys(client, projects["north"])) == 2  # and nothing was imported twice meanwhile


def test_a_site_whose_project_fails_keeps_its_tasks_waiting_not_parked(label_studio, tmp_path):
    """Two projects with the site's title (an admin's copy): making the project fails for the site, not for any
    task of it. Such a failure counted an attempt against every pending task of the site, so after MAX_ATTEMPTS
    rounds (minutes, at the poll period) they were parked for good and the cells never asked about."""
    from label_studio_sdk import LabelStudio

    from labelstudio.bootstrap import ensure_project
    from labelstudio.outbox import MAX_ATTEMPTS, Outbox
    from labelstudio.push import project_task_keys, push_outbox

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    title = f"push faults {next(_names)} twice"
    twins = [client.projects.create(title=title).id for _ in range(2)]

    def ensure(site: str, classes: list[str]) -> int:
        return ensure_project(client, title, classes, labels_required=1)

    outbox = Outbox(tmp_path / "outbox.db")
    outbox.enqueue([_task("east", 0), _task("east", 1)])
    for _ in range(MAX_ATTEMPTS + 1):
        report = push_outbox(client, outbox, ensure, batch=10)
        assert (report.pushed, report.failed, report.pending) == (0, 0, 2)
        assert "2 Label Studio projects are titled" in report.site_errors["east"]
    assert outbox.failures() == [] and len(outbox.pending()["east"]) == 2  # waiting, no attempt against them
    client.projects.delete(id=twins[1])  # the extra copy removed: the next push delivers them
    report = push_outbox(client, outbox, ensure, batch=10)
    assert (report.pushed, report.pending, report.site_errors) == (2, 0, {})
    assert set(project_task_keys(client, twins[0])) == {"east:cell0.png@v1", "east:cell1.png@v1"}


def test_label_studio_failing_on_every_import_parks_no_task(label_studio, tmp_path, monkeypatch):
    """Label Studio answers 500 to every import for a while (its database locked under load, say) and still lists
    its projects: each task was blamed, one attempt each push, and after MAX_ATTEMPTS pushes (minutes at the push
    period) the whole queue was parked for good, its cells never asked about. A push in which Label Studio took
    none of a site's tasks now blames none of them; once it takes tasks again they all arrive, once."""
    from label_studio_sdk import LabelStudio

    import labelstudio.outbox
    from labelstudio.outbox import Outbox
    from labelstudio.push import project_task_keys, push_outbox
    from tests.faults import FailingServer

    # parked after 2 refusals, not 5: the waits, not the fault, were 40 s of the suite's time (an import is sent
    # once per push, without the SDK's own retries of a 500)
    monkeypatch.setattr(labelstudio.outbox, "MAX_ATTEMPTS", 2)
    front = FailingServer(label_studio.url, lambda method, path: method == "POST" and "/import" in path)
    try:
        client = LabelStudio(base_url=front.url, api_key=label_studio.token)
        outbox = Outbox(tmp_path / "outbox.db")
        outbox.enqueue([_task("north", i) for i in range(3)])
        ensure, projects = _site_projects(client)
        front.failing = True
        for _ in range(labelstudio.outbox.MAX_ATTEMPTS + 1):
            report = push_outbox(client, outbox, ensure, batch=2)
            assert (report.pushed, report.failed, report.pending) == (0, 0, 3)
            assert "500" in report.site_errors["north"]
        assert outbox.failures() == [] and len(outbox.pending()["north"]) == 3
        front.failing = False
        report = push_outbox(client, outbox, ensure, batch=2)
        assert (report.pushed, report.failed, report.pending, report.site_errors) == (3, 0, 0, {})
        assert len(project_task_keys(client, projects["north"])) == 3
        # a task Label Studio fails on while it takes another site's: the task's own fault, an attempt counted
        # (alone in its site, it was never blamed, never parked)
        ensure("south", CLASSES)
        poisoned = f"/api/projects/{projects['south']}/import"
        front.fails = lambda method, path: method == "POST" and path.startswith(poisoned)
        front.failing = True
        outbox.enqueue([_task("north", 9), _task("south", 9)])
        report = push_outbox(client, outbox, ensure, batch=2)
        assert (report.pushed, report.failed, report.site_errors) == (1, 1, {})
        [(key, attempts, _)] = outbox.failures()
        assert key == "south:cell9.png@v1" and attempts == 1
    finally:
        front.close()


def test_an_import_whose_answer_a_proxy_lost_leaves_no_twin(label_studio, tmp_path):
    """A proxy before Label Studio answers 504 to an import Label Studio committed. The SDK sent the import again
    by itself (its retries of 5xx), the push saw one send answered, and the second copy of each task stayed in the
    project for good, each cell asked twice. Imports are sent once per push now: the next push finds the tasks
    the lost answer was for in the project and records them, sending nothing twice."""
    from label_studio_sdk import LabelStudio

    from labelstudio.outbox import Outbox
    from labelstudio.push import push_outbox
    from tests.faults import AnswerLostServer

    front = AnswerLostServer(label_studio.url, lambda method, path: method == "POST" and "/import" in path)
    try:
        client = LabelStudio(base_url=front.url, api_key=label_studio.token)
        outbox = Outbox(tmp_path / "outbox.db")
        outbox.enqueue([_task("west", i) for i in range(3)])
        ensure, projects = _site_projects(client)
        first = push_outbox(client, outbox, ensure, batch=10)
        assert front.lost == 0  # the fault happened: the import committed, its answer lost
        assert first.pushed == 0 and first.pending == 3 and "504" in (first.error or "")
        second = push_outbox(client, outbox, ensure, batch=10)
        assert (second.already_there, second.pending, second.error) == (3, 0, None)
        keys = [t.data["task_key"] for t in client.tasks.list(project=projects["west"], fields="task_only")]
        assert sorted(keys) == [f"west:cell{i}.png@v1" for i in range(3)]  # each cell asked once
    finally:
        front.close()


def test_connecting_names_the_token_only_when_label_studio_refuses_it(label_studio):
    """Any failure of the token check (a server error under load, a timeout) was reported as Label Studio refusing
    the API token, sending an operator to the token when the server was the trouble."""
    from labelstudio.client import LabelStudioUnavailable, connect
    from tests.faults import FailingServer

    with pytest.raises(LabelStudioUnavailable, match="refused the API token"):
        connect(label_studio.url, "not-the-token")
    front = FailingServer(label_studio.url, lambda method, path: "whoami" in path)
    try:
        front.failing = True
        with pytest.raises(LabelStudioUnavailable, match="failed to say who the API token is.*500") as failed:
            connect(front.url, label_studio.token)
        assert "refused" not in str(failed.value)
        front.failing = False
        assert connect(front.url, label_studio.token) is not None
    finally:
        front.close()


def test_a_poll_reads_every_project_titled_for_a_site(label_studio, tmp_path):
    """Two projects with one site's title (two bootstraps racing, an admin's copy), labelled in both: keyed by site,
    the poll read one of them, and the other's labels came only by webhook, their deletions never retracted."""
    from labelstudio.bootstrap import ensure_project
    from labelstudio.loop import ReviewLoop
    from labelstudio.store import LabelStore

    template = f"poll copies {next(_names)} {{site}}"
    review = label_studio.settings.review.model_copy(update={"project_title": template})
    loop = ReviewLoop(label_studio.settings.model_copy(update={"review": review}))
    loop.store = LabelStore(tmp_path / "labels.db")  # its own: the session's home's store is other tests' world
    title = template.format(site="east")
    first = ensure_project(loop.client, title, CLASSES, labels_required=1)
    copy = loop.client.projects.create(title=title, label_config=loop.client.projects.get(id=first).label_config).id
    labelled = []
    for i, project_id in enumerate((first, copy)):
        task = {"data": {"image": f"/data/cell{i}.png", "site": "east", "cell_id": f"cell{i}.png"}}
        loop.client.projects.import_tasks(id=project_id, request=[task])
        [task_id] = [t.id for t in loop.client.tasks.list(project=project_id)]
        labelled.append(label(loop.client, task_id, "monocyte"))
    assert sorted(project_id for site, project_id in loop.titled_projects() if site == "east") == sorted([first, copy])
    loop.sync()
    assert set(labelled) <= live(loop.store)


def test_a_poll_sets_our_webhook_on_every_project_not_only_those_a_push_reaches(label_studio, tmp_path):
    """A project whose webhook still calls the receiver as before server identities (no `server` in its URL: every
    event refused) kept it until a push reached its site, and a site with no task waiting never was: its labels
    came back only by the poll. The poll now sets the webhook on every project it reads."""
    from labelstudio.bootstrap import SECRET_HEADER
    from labelstudio.loop import ReviewLoop
    from labelstudio.store import LabelStore
    from ops.stack import webhook_url

    template = f"hooks {next(_names)} {{site}}"
    review = label_studio.settings.review.model_copy(update={"project_title": template})
    loop = ReviewLoop(label_studio.settings.model_copy(update={"review": review}))
    loop.store = LabelStore(tmp_path / "labels.db")  # its own: the session's home's store is other tests' world
    project_id = loop.bootstrap("idle", CLASSES)

    def hooks() -> list[str]:
        listed = loop.client.webhooks.list(project=str(project_id))
        return [h.url for h in listed if h.project == project_id and SECRET_HEADER in (h.headers or {})]

    [hook] = [h for h in loop.client.webhooks.list(project=str(project_id)) if h.project == project_id]
    loop.client.webhooks.update(id=hook.id, url=webhook_url(loop.settings))  # as set before server identities
    assert hooks() == [webhook_url(loop.settings)]
    loop.sync()
    assert hooks() == [loop._webhook_url()] and "server=" in hooks()[0]


def test_tasks_of_a_deleted_project_are_sent_again_unless_their_cell_is_settled(label_studio, tmp_path):
    """An admin deletes a site's project; the next push makes the site a new one. The outbox counted
    its tasks delivered, so their cells were never asked again; a cell whose consensus is in stays settled."""
    from label_studio_sdk import LabelStudio

    from labelstudio.outbox import Outbox
    from labelstudio.push import project_task_keys, push_outbox
    from labelstudio.store import cell_key

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.enqueue([_task("west", 0), _task("west", 1), _task("west", 2)])
    ensure, projects = _site_projects(client)
    assert push_outbox(client, outbox, ensure, batch=10).pushed == 3
    client.projects.delete(id=projects.pop("west"))
    settled = {cell_key("west", "cell2.png")}  # its labels came back before the project went
    report = push_outbox(client, outbox, ensure, batch=10, settled=settled)
    assert (report.resent, report.pushed, report.pending) == (2, 2, 0)
    assert set(project_task_keys(client, projects["west"])) == {"west:cell0.png@v1", "west:cell1.png@v1"}
    again = push_outbox(client, outbox, ensure, batch=10, settled=settled)
    assert (again.resent, again.pushed) == (0, 0)  # delivered once, not on every push


def test_two_pushes_at_once_import_each_task_once(label_studio, tmp_path):
    import threading

    from label_studio_sdk import LabelStudio

    from labelstudio.outbox import Outbox
    from labelstudio.push import push_outbox

    admin = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    ensure, projects = _site_projects(admin)
    ensure("east", CLASSES)
    Outbox(tmp_path / "outbox.db").enqueue([_task("east", i) for i in range(30)])
    start, reports, errors = threading.Barrier(2), [], []

    def push() -> None:  # each its own client and outbox handle, as two processes would have
        client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
        start.wait()
        try:
            reports.append(push_outbox(client, Outbox(tmp_path / "outbox.db"), ensure, batch=5))
        except BaseException as error:  # one push sends all 30: a racer that failed would go unseen otherwise
            errors.append(error)

    threads = [threading.Thread(target=push) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and not any(thread.is_alive() for thread in threads), errors
    assert len(reports) == 2 and sum(r.pushed for r in reports) == 30
    keys = [t.data["task_key"] for t in admin.tasks.list(project=projects["east"], fields="task_only")]
    assert len(keys) == 30 == len(set(keys))


def test_a_chunk_label_studio_took_before_our_bookkeeping_failed_is_not_imported_again(
    label_studio, tmp_path, monkeypatch
):
    """Label Studio takes a chunk of tasks, then recording that in the outbox fails: another connection holds the
    outbox's write lock past the busy timeout ("database is locked"), once. The retry one task at a time used to
    import the whole chunk a second time; it now asks the project which are there first."""
    import sqlite3

    from label_studio_sdk import LabelStudio

    from labelstudio import sqlite as review_sqlite
    from labelstudio.outbox import Outbox
    from labelstudio.push import project_task_keys, push_outbox

    monkeypatch.setattr(review_sqlite, "BUSY_TIMEOUT_S", 0.5)  # the wait before giving up, not the fault

    class LockedOnce(Outbox):
        def __init__(self, path):
            super().__init__(path)
            self.failures: list[Exception] = []

        def mark_pushed(self, server, project_id, task_ids):
            if self.failures:
                return super().mark_pushed(server, project_id, task_ids)
            holder = sqlite3.connect(self.path, isolation_level=None)  # a second writer, as the receiver would be
            holder.execute("BEGIN IMMEDIATE")
            try:
                super().mark_pushed(server, project_id, task_ids)
            except sqlite3.OperationalError as error:
                self.failures.append(error)
                raise
            finally:
                holder.execute("ROLLBACK")
                holder.close()

    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    outbox = LockedOnce(tmp_path / "outbox.db")
    outbox.enqueue([_task("west", i) for i in range(4)])
    ensure, projects = _site_projects(client)
    report = push_outbox(client, outbox, ensure, batch=10)
    assert [str(e) for e in outbox.failures] == ["database is locked"]  # the fault happened
    assert (report.pushed, report.failed, report.pending, report.error) == (4, 0, 0, None)
    keys = [t.data["task_key"] for t in client.tasks.list(project=projects["west"], fields="task_only")]
    assert len(keys) == 4 == len(set(keys)) and set(keys) == set(project_task_keys(client, projects["west"]))


def test_an_import_label_studio_commits_after_the_next_listing_leaves_no_unlabelled_twin(
    label_studio, tmp_path, request
):
    """An import times out (Label Studio has not answered yet), the next push lists the project without the
    tasks and imports them again, and Label Studio commits the first import after all, an annotator labelling one
    of its tasks at once: two tasks of each key. They used to stay, so the cells were asked twice; the push now
    deletes the twins nobody labelled, keeps the one the outbox recorded, and keeps a twin that holds a label.
    The push talks to Label Studio through a front that holds the first import (its client times out for real)
    and hands it on when the second push's import arrives."""
    import json

    from label_studio_sdk import LabelStudio

    from labelstudio.outbox import Outbox
    from labelstudio.push import push_outbox
    from tests.faults import LateServer

    admin = LabelStudio(base_url=label_studio.url, api_key=label_studio.token)
    front = LateServer(label_studio.url, lambda method, path: method == "POST" and "/import" in path)
    late_ids: list[int] = []

    def commit_late(method: str, path: str) -> None:  # lands after this push's listing, just before its own import
        if method == "POST" and "/import" in path and front.held and not late_ids:
            late_ids.extend(json.loads(front.commit_held())["task_ids"])
            label(admin, late_ids[0], "monocyte")

    front.before = commit_late
    request.addfinalizer(front.close)
    client = LabelStudio(base_url=front.url, api_key=label_studio.token, timeout=6)
    real_import = admin.projects.import_tasks
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.enqueue([_task("east", i) for i in range(3)])
    ensure, projects = _site_projects(client)
    first = push_outbox(client, outbox, ensure, batch=10)
    assert first.error and "timed out" in first.error and first.pending == 3  # the fault happened
    second = push_outbox(client, outbox, ensure, batch=10)
    assert len(late_ids) == 3  # the fault happened: each key imported twice
    assert (second.pushed, second.pending, second.error, second.twins_removed) == (3, 0, None, 2)
    recorded = set(outbox.watched(server_identity(client))[projects["east"]].values())
    left = {t.id: t.data["task_key"] for t in client.tasks.list(project=projects["east"], fields="task_only")}
    assert not recorded & set(late_ids) and set(left) == recorded | {late_ids[0]}
    assert len(set(left.values())) == 3  # every cell still asked, the labelled one's twin kept
    assert push_outbox(client, outbox, ensure, batch=10).twins_removed == 0
    # a twin landing after someone deleted the recorded task is that cell's only task now: it stays
    key, recorded_id = next((k, i) for k, i in outbox.watched(server_identity(client))[projects["east"]].items())
    twin = [_task("east", int(key.split("cell")[1][0]))]
    [only] = real_import(id=projects["east"], request=twin, return_task_ids=True).task_ids
    client.tasks.delete(id=recorded_id)
    assert push_outbox(client, outbox, ensure, batch=10).twins_removed == 0
    assert only in {t.id for t in client.tasks.list(project=projects["east"], fields="task_only")}
