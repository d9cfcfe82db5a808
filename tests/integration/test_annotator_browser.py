"""An annotator's real day, in a real browser: Debian's Chromium, driven by Selenium, against the real Label Studio.

Everything an annotator touches is real: the account made through the invite link, Label Studio's login form, the
labelling view CytoLoop configures (`labelstudio/label_config.py`), the cell image served from the images root,
the class hotkeys, the field for a class the list lacks, and the Submit button. The label must then arrive in
CytoLoop's label store. Screenshots of each step (annotator-*.png) are kept under runs/test-artefacts/, so a person
can look at what the test saw.

Chromium and ChromeDriver come from Debian (`make test` installs the packages chromium and chromium-driver);
without them this test fails and says so: it never skips.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest

from cytoloop.data.records import load_records
from cytoloop.models.base import Predictions

pytestmark = pytest.mark.integration

ARTEFACTS = Path(__file__).resolve().parents[2] / "runs" / "test-artefacts"
CLASSES = ["lymphocyte", "monocyte", "neutrophil"]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Chromium on a machine without a network: no sandbox (root), no GPU, and none of its background connections
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


@pytest.fixture
def browser(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found: `make test` installs Debian's chromium and chromium-driver "
            "(or: apt-get install -y chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def cell_images(driver) -> list[dict]:
    """The cell images on the page (served from the images root through Label Studio's local files) and how
    they decoded: a broken or unloaded image has naturalWidth 0."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('img'))"
        ".filter(img => img.src.includes('local-files'))"
        ".map(img => ({src: img.src, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight}));"
    )


def test_an_annotator_labels_a_routed_cell_with_a_hotkey_in_a_real_browser(label_studio, cells_dir, tmp_path, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from labelstudio.client import invite_url, user_token
    from labelstudio.label_config import NEW_CLASS_PLACEHOLDER
    from labelstudio.loop import ReviewLoop

    # a project of its own (its own title, label store and a webhook port nobody listens on: this label comes back
    # by the poll, and the session's receiver never sees it), one cell routed for review
    settings = label_studio.settings
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(Path(settings.home) / "secrets.json", home / "secrets.json")  # the same Label Studio admin
    review = settings.review.model_copy(update={"project_title": "Browser test: {site}", "webhook_port": free_port()})
    loop = ReviewLoop(settings.model_copy(update={"home": home, "review": review}))
    record = next(r for r in load_records(cells_dir) if r.domain == "jtsc" and r.label in CLASSES)
    uncertain = Predictions(np.array([[0.45, 0.35, 0.20]]), np.zeros(1), np.ones(1))
    report = loop.route([record], uncertain, CLASSES, model_version="browser-v1")
    assert report.chosen == 1 and report.push.pushed == 1, report
    project_id = loop.projects()["jtsc"]
    (task,) = loop.client.tasks.list(project=project_id)

    # an annotator who joined through the invite link logs in through Label Studio's own form
    email, password = "browser.annotator@lab.test", "annotator-pw-123"
    user_token(label_studio.url, email, password, invite_url(label_studio.url, label_studio.token))
    browser.get(f"{label_studio.url}/user/login/")
    browser.find_element(By.NAME, "email").send_keys(email)
    browser.find_element(By.NAME, "password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit], form input[type=submit]").click()
    wait_until(lambda: "/user/login" not in browser.current_url, 60, "the login to go through")

    # the routed task opens and its cell image really rendered
    browser.get(f"{label_studio.url}/projects/{project_id}/data?task={task.id}")
    loaded = wait_until(
        lambda: [i for i in cell_images(browser) if i["complete"] and i["width"] > 0], 120, "the cell image to render"
    )
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTEFACTS / "annotator-task.png"))
    assert loaded[0]["width"] > 0 and loaded[0]["height"] > 0, loaded
    assert Path(record.path).name in unquote(loaded[0]["src"])  # this cell's own file, served from the images root

    # "other/unknown" (hotkey u) opens the field for a class name the list lacks; another class closes it again
    def new_class_field_shown() -> bool:
        # a one-row TextArea is drawn as an <input>: look for the placeholder on any element
        fields = browser.find_elements(By.CSS_SELECTOR, f'[placeholder="{NEW_CLASS_PLACEHOLDER}"]')
        return any(field.is_displayed() for field in fields)

    assert not new_class_field_shown()  # the model's answer (a class of the list) is pre-selected
    ActionChains(browser).send_keys("u").perform()
    browser.save_screenshot(str(ARTEFACTS / "annotator-other.png"))
    wait_until(new_class_field_shown, 10, "the new-class field after choosing other/unknown")

    # the second class by its hotkey (the pre-annotation showed the model's answer, the first class), then Submit
    ActionChains(browser).send_keys("2").perform()
    wait_until(lambda: not new_class_field_shown(), 10, "the new-class field to close")
    browser.save_screenshot(str(ARTEFACTS / "annotator-hotkey.png"))
    submit = wait_until(
        lambda: [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Submit"],
        30,
        "the Submit button",
    )
    submit[0].click()
    try:
        wait_until(lambda: list(loop.client.annotations.list(id=task.id)), 60, "the annotation to be saved")
    finally:
        browser.save_screenshot(str(ARTEFACTS / "annotator-submitted.png"))

    # the label arrives in CytoLoop's label store, as this annotator's, for this cell and model version
    assert loop.sync().changed == 1
    (label,) = loop.store.labels()
    assert (label.label, label.annotator) == (CLASSES[1], email)
    assert label.task_key == task.data["task_key"]
