"""The review loop in one object: route scored cells out to Label Studio, bring labels back, export consensus.

Data flow (docs/review-loop.md): predictions -> `cytoloop.policy.routing` (reason per cell, budget) -> outbox (SQLite)
-> Label Studio project of the cell's site -> hematologists label -> webhook events (SQLite) + poll -> label store
(SQLite) -> consensus -> training manifest. Every arrow is idempotent, and everything durable lives under
`<home>/review/`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from cytoloop.config import RoutingConfig, Settings
from cytoloop.data.records import CellRecord
from cytoloop.errors import UsageError
from cytoloop.policy.consensus import consensus
from cytoloop.policy.routing import ScoredCell, route_cells, select_for_review
from labelstudio.bootstrap import (
    ensure_image_storage,
    ensure_labels_required,
    ensure_project,
    ensure_webhook,
    project_title,
)
from labelstudio.client import as_failure, connect, server_identity, unavailable
from labelstudio.export import export_manifest, review_report
from labelstudio.outbox import Outbox
from labelstudio.push import PushReport, push_outbox
from labelstudio.store import LabelStore, cell_key
from labelstudio.sync import SyncReport, sync
from labelstudio.tasks import CellContext, build_task, cell_uid, hidden_context, image_url, task_key
from ops.stack import label_studio_url, stack_secrets, webhook_url

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import numpy as np
    from label_studio_sdk import LabelStudio

    from cytoloop.models.base import Predictions


@dataclass
class RouteReport:
    reasons: dict[str, int]
    already_queued: int
    chosen: int
    queued: int
    already_decided: int = 0  # routed for review, but the cell already has its consensus: not asked again
    push: PushReport | None = None
    by_site: dict[str, int] = field(default_factory=dict)
    reason_of: dict[str, str] = field(default_factory=dict)  # each scored cell's path -> its route
    sent_paths: list[str] = field(default_factory=list)  # the paths of the cells chosen for tasks this time


def thumbnails(images: np.ndarray, size: int = 4) -> np.ndarray:
    """(N, 3, S, S) preprocessed cells -> (N, 3*size*size) block means: a near-duplicate signature."""
    n, channels, side, _ = images.shape
    block = side // size
    cropped = images[:, :, : block * size, : block * size]
    return cropped.reshape(n, channels, size, block, size, block).mean(axis=(3, 5)).reshape(n, -1)


def sample_of(record: CellRecord) -> str:
    """The sample (smear/slide) a cell comes from: its folder inside the dataset, else its domain."""
    parent = str(Path(record.cell_id).parent)
    return parent if parent not in ("", ".") else record.domain


def label_store_path(settings: Settings) -> Path:
    """Where a home's labels are kept (`home/review/labels.db`, the outbox beside it)."""
    return Path(settings.home) / "review" / "labels.db"


def outbox_path(settings: Settings) -> Path:
    """Where a home's tasks wait for Label Studio (`review route` fills it, `review push` empties it)."""
    return label_store_path(settings).with_name("outbox.db")


class ReviewLoop:
    """All review-loop operations for one configuration. Label Studio is contacted lazily, only when needed."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.url = label_studio_url(settings)
        self._client: LabelStudio | None = None
        self._server: str | None = None
        # (receiver URL, labels required, project) this loop has set the project to: the poll sets each once, not
        # every period (the URL names the server)
        self._kept: set[tuple[str, int, int]] = set()

    # opened on first use: made at once, a sync that failed to reach Label Studio (a mistyped home) left an empty
    # store behind, and `review report` and `export`'s guard against a home without one then took it for a lab's
    @functools.cached_property
    def store(self) -> LabelStore:
        return LabelStore(label_store_path(self.settings))

    @functools.cached_property
    def outbox(self) -> Outbox:
        return Outbox(outbox_path(self.settings))

    @property
    def client(self) -> LabelStudio:
        if self._client is None:
            self._client = connect(self.url, stack_secrets(self.settings)["admin_token"])
        return self._client

    # -- projects ---------------------------------------------------------------------------------------------
    def bootstrap(self, site: str, classes: Sequence[str]) -> int:
        """The site's project (created or updated) with its webhook to our receiver and its image storage;
        idempotent."""
        review = self.settings.review
        project_id = ensure_project(
            self.client, project_title(review.project_title, site), classes, review.labels_required
        )
        ensure_webhook(self.client, project_id, self._webhook_url(), stack_secrets(self.settings)["webhook_secret"])
        ensure_image_storage(self.client, project_id, self.images_root)
        return project_id

    def _webhook_url(self) -> str:
        """Our receiver's URL as this Label Studio's webhooks call it: the query says which server an event is from."""
        return f"{webhook_url(self.settings)}?{urlencode({'server': self.server})}"

    def ensure_projects(self, project_ids: Sequence[int]) -> None:
        """Our webhook, and the labels a cell needs (`maximum_annotations`), on each project as `bootstrap` sets
        them, for every project and not only those a push reaches: a site with no task waiting kept a webhook from
        before (no server in its URL: its events refused; the receiver's old port: sent nowhere), and its labels
        came back only by the poll; or kept the labels required before the setting was raised, its cells pending
        for good. Best effort per project; once per project, receiver URL and labels required for this loop."""
        url, secret = self._webhook_url(), stack_secrets(self.settings)["webhook_secret"]
        required = self.settings.review.labels_required
        for project_id in project_ids:
            if (url, required, project_id) in self._kept:
                continue
            try:
                ensure_webhook(self.client, project_id, url, secret)
                ensure_labels_required(self.client, project_id, required)
                self._kept.add((url, required, project_id))
            except Exception as error:
                if unavailable(error):
                    raise
                logger.warning(f"project {project_id} is checked next time: {type(error).__name__}: {error}")

    @property
    def server(self) -> str:
        """The identity of the Label Studio this loop talks to (labels and pushed tasks are keyed by it), read once
        (`serve`'s poll asks again every round)."""
        if self._server is None:
            self._server = server_identity(self.client)
        return self._server

    @property
    def images_root(self) -> Path:
        if self.settings.stack.images_root is None:
            raise UsageError(
                "stack.images_root is not set: the folder of cell images Label Studio serves tasks from "
                "(CYTOLOOP_STACK__IMAGES_ROOT=/path/to/cells)"
            )
        return Path(self.settings.stack.images_root)

    def check_images(self, records: Sequence[CellRecord]) -> None:
        """Refuse, before any scoring, cells Label Studio could not show annotators: no images folder set, one
        that is not a folder, or a cell outside it (`tasks.image_url` names the first). Routing checked this only
        when it built the tasks, after every cell was scored."""
        root = self.images_root
        if not root.is_dir():
            raise UsageError(f"stack.images_root {root} is not a folder (CYTOLOOP_STACK__IMAGES_ROOT)")
        for record in records:
            image_url(record.path, root)

    def projects(self) -> dict[str, int]:
        """site -> project id of every project whose title follows our template (of a site with two such projects,
        the last listed: `titled_projects` has them all)."""
        return dict(self.titled_projects())

    def titled_projects(self) -> list[tuple[str, int]]:
        """(site, project id) of every project whose title follows our template, a site's copies included: two
        bootstraps racing, or an admin's copy, can give a site two projects, and annotators may label in both."""
        prefix, _, suffix = self.settings.review.project_title.partition("{site}")
        return [
            (p.title[len(prefix) : len(p.title) - len(suffix)], p.id)
            for p in self.client.projects.list()
            if p.title.startswith(prefix) and p.title.endswith(suffix) and len(p.title) > len(prefix) + len(suffix)
        ]

    # -- out: routing and pushing --------------------------------------------------------------------------------
    def route(
        self,
        records: Sequence[CellRecord],
        predictions: Predictions,
        classes: Sequence[str],
        model_version: str,
        site: str | None = None,
        budget: int | None = None,
        push: bool = True,
        images: np.ndarray | None = None,
        routing: RoutingConfig | None = None,
    ) -> RouteReport:
        """Route scored cells, queue this round's selection in the outbox, and push it if Label Studio is up.

        `records[i]` is the cell scored in row i of `predictions` (and of `images`, the preprocessed cells, whose
        4x4 thumbnails tell near-duplicates apart; without them no cell is taken for another's near-duplicate: the
        probability vectors were used, and every confident cell of one class looked like every other, so the
        demo's site-b sent 14 of its 40 a round). Each cell goes to the
        project of `site` (default: its domain). Cells already queued for this model version are not chosen again,
        and cells whose labels already agree (consensus) are not routed again for a newer version. A cell is its
        image's content (`tasks.cell_uid`), whatever its file is called. `routing` replaces the configured
        routing for this call (say, a site's own anomaly threshold).
        """
        if len(records) != len(predictions) or (images is not None and len(images) != len(records)):
            raise ValueError(
                f"{len(records)} records, {len(predictions)} predictions"
                + ("" if images is None else f", {len(images)} images")
                + ": they must match"
            )
        sites = [site or r.domain for r in records]
        uids = [cell_uid(r.path) for r in records]
        signatures = [()] * len(records) if images is None else thumbnails(images)  # empty: never alike
        scored = [
            ScoredCell(
                uid,
                sample_of(r),
                classes[int(label)],
                float(conf),
                float(anomaly),
                tuple(float(v) for v in signature),
            )
            for r, uid, label, conf, anomaly, signature in zip(
                records, uids, predictions.labels, predictions.confidence, predictions.anomaly, signatures
            )
        ]
        routing = routing or self.settings.routing
        routed = route_cells(scored, routing)
        keys = [task_key(s, c.cell_id, model_version) for s, c in zip(sites, scored)]
        seen = self.outbox.known(keys)
        agreed = self.agreed_cells()
        decided = [cell_key(s, c.cell_id) in agreed for s, c in zip(sites, scored)]
        # one task per key: the same image twice in one call (two files, or two labs' copies) spent two picks of
        # the budget on one task, and, keyed by image alone, both went to the last copy's site
        fresh, taken = [], set()
        for r, k, done in zip(routed, keys, decided):
            if k not in seen and not done and k not in taken:
                fresh.append(r)
                taken.add(k)
        chosen = select_for_review(fresh, routing, budget)
        context = {id(c): (r, s) for c, r, s in zip(scored, records, sites)}  # the scored cell: its record, site
        tasks = []
        for item in chosen:
            record, cell_site = context[id(item.cell)]
            cell = CellContext(record.path, cell_site, record.domain, model_version, tuple(classes), record.cell_id)
            tasks.append(build_task(item, cell, self.images_root))
        # the model's answer, kept where annotators cannot read it (audit tasks do not carry it)
        self.store.keep_context({t["data"]["task_key"]: hidden_context(item) for t, item in zip(tasks, chosen)})
        queued = self.outbox.enqueue(tasks)
        report = RouteReport(
            reasons=dict(Counter(r.reason for r in routed)),
            already_queued=sum(1 for r, k in zip(routed, keys) if k in seen and r.reason != "accept"),
            chosen=len(chosen),
            already_decided=sum(1 for r, done in zip(routed, decided) if done and r.reason != "accept"),
            queued=queued,
            by_site=dict(Counter(t["data"]["site"] for t in tasks)),
            reason_of={str(r.path): item.reason for r, item in zip(records, routed)},
            sent_paths=[str(context[id(item.cell)][0].path) for item in chosen],
        )
        if push:
            report.push = self.push()
        return report

    def agreed_cells(self) -> set[str]:
        """The cells (`store.cell_key`) whose labels already agree: not asked again, under any model or server."""
        votes = consensus(self.store.votes(), self.settings.review.labels_required)
        return {key for key, cell in votes.items() if cell.status == "agreed"}

    def push(self) -> PushReport:
        """Send the outbox to Label Studio; when it is unreachable the tasks stay queued (report.error says why).
        Tasks an earlier Label Studio took go to this one too, unless their cells' labels already agree."""
        try:
            client, server = self.client, self.server
        except Exception as error:  # unreachable, or failing on which server it is (500): the tasks wait
            failure = as_failure(error, self.url, "when asked which server it is")
            if not unavailable(error) and failure is None:
                raise
            return PushReport(pending=self.outbox.counts()["pending"], error=str(failure or error))
        return push_outbox(
            client,
            self.outbox,
            self.bootstrap,
            batch=self.settings.review.push_batch,
            server=server,
            settled=self.agreed_cells(),
        )

    # -- back: labels ---------------------------------------------------------------------------------------------
    def sync(self, on_annotation: Callable[[int], None] | None = None) -> SyncReport:
        """Check our webhook and the labels required on every review project (`ensure_projects`), apply
        stored webhook events, then poll every review project (catches what webhooks missed), each of a site's
        copies too (keyed by site, one of two copies was never polled: its labels only came by webhook)."""
        try:
            projects = [project_id for _, project_id in self.titled_projects()]
            self.ensure_projects(projects)
            return sync(self.client, self.store, projects, self.server, on_annotation=on_annotation)
        except Exception as error:  # a timeout or a 500 half-way: what was stored stays (the store is idempotent)
            failure = as_failure(error, self.url, "during the sync; the labels stored before are kept, sync again")
            if failure is None:
                raise
            raise failure from error

    def report(self) -> dict:
        return review_report(self.store, self.settings.review.labels_required)

    def export(self, out: Path) -> dict:
        """The consensus labels as a training manifest; refused without `stack.images_root`, the only check that
        keeps a task edited to name another file (any Label Studio member can) out of training."""
        return export_manifest(self.store, out, self.settings.review.labels_required, images_root=self.images_root)

    # -- the long-running receiver -------------------------------------------------------------------------------
    def serve(self) -> None:
        """Run the webhook receiver (foreground) with a background poll + push every `review.poll_every_s`."""
        import uvicorn

        from labelstudio.webhook import create_app

        review = self.settings.review
        stop = threading.Event()

        def attempt(what: str, action: Callable[[], object]) -> object | None:
            try:
                return action()
            except Exception as error:  # keep polling: Label Studio may be restarting
                if not unavailable(error):
                    logger.warning(f"{what} failed: {type(error).__name__}: {error}")
                self._client = None
                return None

        def identify() -> bool:
            """Ask which Label Studio this is, each round: a Label Studio replaced between two rounds is another
            server, whose labels must not be filed under the old one's identity nor its tasks taken for the old
            one's. The answer replaces the old one once it is had: the webhook checks each event against the
            identity last known, and while it was reset to none for the asking (or for as long as Label Studio was
            unreachable) it took events naming any server, filed for good under a server no poll reconciles."""
            fresh = attempt("asking Label Studio which server it is", lambda: server_identity(self.client))
            if isinstance(fresh, str):
                self._server = fresh
                return True
            return False

        def periodic() -> None:  # the push and the poll fail apart: a push that fails still lets labels come back
            # until Label Studio was reached once, asked every few seconds: the webhook refuses events meanwhile
            while not stop.wait(review.poll_every_s if self._server else min(5.0, review.poll_every_s)):
                if not identify():  # unreachable (or refusing us): push and poll next round
                    continue
                pushed = attempt("push", self.push)
                synced = attempt("poll", self.sync)
                if isinstance(pushed, PushReport):
                    logger.info(
                        f"push: {pushed.pushed} pushed, {pushed.pending} pending, {pushed.failed} refused"
                        + "".join(f"; site {site} waits: {error}" for site, error in pushed.site_errors.items())
                    )
                if isinstance(synced, SyncReport):
                    logger.info(
                        f"poll: {synced.changed} label(s) changed, {synced.retracted} retracted, "
                        f"{synced.restored} restored, {synced.unchecked} unchecked"
                    )

        identify()  # before the receiver listens, so that it can tell whose events it takes from the first one
        worker = threading.Thread(target=periodic, name="review-poll", daemon=True)
        worker.start()
        # the identity as the poll last asked it: a webhook request never waits on Label Studio (it gives 1 s)
        app = create_app(self.store, stack_secrets(self.settings)["webhook_secret"], known_server=lambda: self._server)
        try:
            uvicorn.run(app, host=review.webhook_host, port=review.webhook_port, log_level="warning")
        finally:
            stop.set()
