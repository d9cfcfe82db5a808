"""Simulated annotators: stand-ins for hematologists in the demo, answering through Label Studio's API.

Each one is a real Label Studio user (signed up like a person would be, with their own API token), so their
annotations carry their identity through webhooks, sync, consensus and export exactly as a hematologist's do.
An annotator answers from the dataset's ground truth and, with probability `error_rate`, picks another of the
task's classes instead: the demo then shows what consensus does with disagreement. A cell whose true class the
task does not offer (a blast, to a model without one) is answered "other/unknown cell" with the class named.
Real people label the same projects in the web UI; nothing downstream can tell the difference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from labelstudio.label_config import NEW_CLASS_PREFIX, answer_result
from labelstudio.sync import as_dict

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio


@dataclass
class SimulatedAnnotator:
    """One annotator account. `truth` maps an image path (resolved) to its true class."""

    email: str
    user_id: int
    client: LabelStudio
    error_rate: float
    seed: int = 0

    @classmethod
    def sign_up(
        cls, url: str, email: str, password: str, error_rate: float, seed: int = 0, invite: str | None = None
    ) -> SimulatedAnnotator:
        """Log in, or sign the user up through the `invite` link when the account does not exist yet, and connect
        with their own token."""
        from label_studio_sdk import LabelStudio

        from labelstudio.client import user_token

        if not 0.0 <= error_rate < 1.0:
            raise ValueError(f"error_rate must be in [0, 1), got {error_rate!r}")
        user_id, token = user_token(url, email, password, invite)
        return cls(email, user_id, LabelStudio(base_url=url, api_key=token), error_rate, seed)

    def answer(self, truth: str, classes: list[str], task_key: str) -> str:
        """The class this annotator gives a cell: the truth (`new:<truth>` when the task does not offer it), or
        (with probability `error_rate`) another of the task's classes.

        Drawn from a hash of (seed, annotator, task), so a rerun gives the same answers and two annotators err
        independently."""
        digest = hashlib.sha256(f"{self.seed}:{self.email}:{task_key}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        right = truth if truth in classes else NEW_CLASS_PREFIX + truth
        others = [c for c in classes if c != truth]
        if draw >= self.error_rate or not others:
            return right
        return others[int.from_bytes(digest[8:16], "big") % len(others)]

    def label_open_tasks(self, project_ids: Iterable[int], truth: Mapping[str, str]) -> int:
        """Annotate every task of these projects this annotator has not annotated yet (once each: rerunning
        annotates nothing twice); returns how many annotations were made. Tasks that already have as many
        annotations as the project asks for are left alone, as Label Studio's queue would. A task whose image has
        no known truth is an error naming it: the demo must only route cells it can answer for."""
        made = 0
        for project_id in project_ids:
            wanted = self.client.projects.get(id=project_id).maximum_annotations or 1
            for task in self.client.tasks.list(project=project_id, fields="all", page_size=200):
                task = as_dict(task)
                annotations = [as_dict(a) for a in task.get("annotations") or []]
                if any(_user(a) == self.user_id for a in annotations) or len(annotations) >= wanted:
                    continue
                data = task["data"]
                path = str(Path(data["image_path"]).resolve())
                if path not in truth:
                    raise KeyError(f"task {task['id']} shows {path}, which has no ground truth in the demo data")
                label = self.answer(truth[path], list(data["classes"]), data["task_key"])
                self.client.annotations.create(id=task["id"], result=answer_result(label))
                made += 1
        return made


def _user(annotation: dict) -> int | None:
    who = annotation.get("completed_by")
    if isinstance(who, dict):
        who = who.get("id")
    return int(who) if who is not None else None
