"""The labelling interface, generated from the model's class list (never hand-copied, so it cannot drift).

One single-choice question, "cell class": the model's classes plus two ways out ("other/unknown cell" and
"not a cell / artefact"); a separate "abnormal — needs senior review" flag, because a cell can be a lymphocyte
AND atypical; and a free comment. The model's prediction pre-fills the class question (not on audits).

For the annotator's day: keys 1-9 answer the first nine classes (u: other/unknown, a: artefact); the image is
shown at one fixed size whatever the crop's pixels, without smoothing (a 32-pixel crop is blown up into sharp
pixels, not a blur), with zoom, brightness and contrast controls. Choosing "other/unknown cell" opens a field to
name the class the model lacks; the label is then `new:<name>` (`parse_result`), which consensus counts like any
class and the export keeps apart for a later model to learn (`export.export_manifest`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from xml.sax.saxutils import quoteattr

from cytoloop.errors import UsageError

CLASS_FROM = "cell_class"
FLAG_FROM = "flags"
COMMENT_FROM = "comment"
NEW_CLASS_FROM = "new_class"
NEW_CLASS_PREFIX = "new:"
NEW_CLASS_PLACEHOLDER = "Which class is it? (a name the list lacks)"
DISPLAY_PX = 360  # the image's size on screen, whatever the crop's pixels
EXTRA_HOTKEYS = ("u", "a")
IMAGE_TO = "image"
OTHER = "other/unknown cell"
ARTEFACT = "not a cell / artefact"
ABNORMAL = "abnormal — needs senior review"
EXTRA_CHOICES = (OTHER, ARTEFACT)


def choices(classes: Sequence[str]) -> list[str]:
    """The values of the class question: the model's classes, then the two ways out."""
    if not classes:
        raise UsageError("the label config needs at least one class")
    clash = [c for c in classes if c in EXTRA_CHOICES or c == ABNORMAL]
    if clash or len(set(classes)) != len(classes):
        raise UsageError(f"class names must be unique and differ from the reserved choices; got {list(classes)}")
    return [*classes, *EXTRA_CHOICES]


def build_label_config(classes: Sequence[str]) -> str:
    """Label Studio XML for a project reviewing cells of these classes."""
    values = choices(classes)
    keys = [str(i + 1) if i < 9 else "" for i in range(len(classes))] + list(EXTRA_HOTKEYS)
    class_choices = "\n".join(
        f"    <Choice value={quoteattr(c)}" + (f' hotkey="{k}"' if k else "") + "/>" for c, k in zip(values, keys)
    )
    return f"""<View>
  <Header value="Cell $cell_name  (sample $sample_id, site $site)"/>
  <Image name="{IMAGE_TO}" value="$image" width="{DISPLAY_PX}px" maxWidth="{DISPLAY_PX}px" smoothing="false"
         zoom="true" zoomControl="true" brightnessControl="true" contrastControl="true"/>
  <Header value="Cell class"/>
  <Choices name="{CLASS_FROM}" toName="{IMAGE_TO}" choice="single-radio" required="true" showInline="false">
{class_choices}
  </Choices>
  <View visibleWhen="choice-selected" whenTagName="{CLASS_FROM}" whenChoiceValue={quoteattr(OTHER)}>
    <TextArea name="{NEW_CLASS_FROM}" toName="{IMAGE_TO}" placeholder="{NEW_CLASS_PLACEHOLDER}" rows="1"
              maxSubmissions="1"/>
  </View>
  <Choices name="{FLAG_FROM}" toName="{IMAGE_TO}" choice="multiple">
    <Choice value={quoteattr(ABNORMAL)}/>
  </Choices>
  <TextArea name="{COMMENT_FROM}" toName="{IMAGE_TO}" placeholder="Comment (optional)" rows="2" maxSubmissions="1"/>
</View>
"""


def config_classes(label_config: str) -> list[str]:
    """The model classes offered by a label config built here (the ways out excluded); [] for any other config."""
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError:
        return []
    question = next((c for c in root.iter("Choices") if c.get("name") == CLASS_FROM), None)
    values = [] if question is None else [c.get("value") for c in question.iter("Choice")]
    return [v for v in values if v and v not in EXTRA_CHOICES]


def prediction_result(label: str) -> list[dict]:
    """The pre-annotation of a task: the model's class, in Label Studio's result format."""
    return [{"from_name": CLASS_FROM, "to_name": IMAGE_TO, "type": "choices", "value": {"choices": [label]}}]


def answer_result(label: str) -> list[dict]:
    """An annotation's result for `label`: a class of the config, or `new:<name>` for "other/unknown cell" with
    the class named in the free field (what `parse_result` reads back)."""
    if not label.startswith(NEW_CLASS_PREFIX):
        return prediction_result(label)
    name = label.removeprefix(NEW_CLASS_PREFIX)
    named = {"from_name": NEW_CLASS_FROM, "to_name": IMAGE_TO, "type": "textarea", "value": {"text": [name]}}
    return prediction_result(OTHER) + [named]


def parse_result(result: Sequence[dict]) -> tuple[str | None, bool, str]:
    """(class, abnormal flag, comment) of an annotation's result; class None when the annotator chose none, and
    `new:<name>` when they chose "other/unknown cell" and named the class (lower case, spaces as '_').

    Label Studio checks only that a result is a list, so a client of its API can store any shape: a ValueError
    names what is not one of ours (a region that is no object, choices or text that are no list of strings). A
    string where the choices belong was read as its first letter, the class "n" for "neutrophil"."""
    label, abnormal, comment, named = None, False, "", ""
    if not isinstance(result or [], list):
        raise ValueError(f"its result is a {type(result).__name__}, not a list of regions")
    for number, region in enumerate(result or [], start=1):
        value = region.get("value") if isinstance(region, dict) else None
        if not isinstance(value or {}, dict) or not isinstance(region, dict):
            raise ValueError(f"result region {number} is not a region object with a value object: {region!r:.80}")
        value = value or {}
        for key in ("choices", "text"):
            given = value.get(key)
            if given is not None and not (isinstance(given, list) and all(isinstance(g, str) for g in given)):
                raise ValueError(f"result region {number}: its {key} are not a list of strings: {given!r:.80}")
        if region.get("from_name") == CLASS_FROM and value.get("choices"):
            label = value["choices"][0]
        elif region.get("from_name") == FLAG_FROM:
            abnormal = ABNORMAL in (value.get("choices") or [])
        elif region.get("from_name") == COMMENT_FROM:
            comment = "\n".join(value.get("text") or [])
        elif region.get("from_name") == NEW_CLASS_FROM:
            named = "_".join(" ".join(value.get("text") or []).lower().split())
    if label == OTHER and named:
        label = NEW_CLASS_PREFIX + named
    return label, abnormal, comment
