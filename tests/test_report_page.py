"""``GET /v1/jobs/{id}/report``: the page, who may see it, and what it shows in a real headless browser.

The browser tests drive Debian's ``chromium`` through ``chromedriver`` (``scripts/test`` installs both, see
``scripts/services.sh``) against ``neuronshap serve`` as a process: a finished job's page draws one mark per
neuron shown, the threshold, the layers and the ablation curves; a running job's page follows the event
stream without a reload; a service that requires keys takes the key from the URL's fragment or a form.

``NEURONSHAP_REPORT_SCREENSHOT=docs/report.png scripts/test tests/test_report_page.py`` refreshes the README's
picture of a finished job's page (every run saves one under pytest's temporary directory).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
import pytest

from app.core.config import Settings
from app.core.db import session_factory
from app.keys.service import create_key
from tests.harness import stacks
from tests.harness.jobs import LONG, QUICK, post_job, problem, submit

T = TypeVar("T")
# 56 neurons, more than the 2 x 20 the page shows: the plot shows the top and bottom ends of the ranking.
FINISHED = {"metric": {"name": "accuracy"}, "estimator": {"top_k": 5, "max_iterations": 200, "seed": 1}}
SHOWN = 20
EDIT = {  # docs/API.md's example of an edit
    "id": "e_1",
    "state": "succeeded",
    "selection": {"negative": True},
    "removed": [{"layer": "conv2", "index": 17, "value": -0.012, "lower": -0.02, "upper": -0.004}],
    "metrics": {
        "job_data": {
            "before": 0.91,
            "after": 0.93,
            "groups": {"0": {"before": 0.99, "after": 0.98}, "1": {"before": 0.80, "after": 0.86}},
        },
        "held_out": None,
    },
    "curve": None,
    "error": None,
}


def until(what: Callable[[], T], message: str, timeout: float = 90.0) -> T:
    """``what()`` once it is truthy; fails with ``message`` after ``timeout`` (a deadline, not a timing claim)."""
    deadline = time.monotonic() + timeout
    while not (value := what()):
        assert time.monotonic() < deadline, message
        time.sleep(0.2)
    return value


# --- the route, without a browser -----------------------------------------------------------------------------


def test_the_page_is_self_contained_html_and_404s_like_the_job(tmp_path, tiny_cnn):
    with stacks.embedded(tmp_path) as stack:
        job = submit(stack.client, tiny_cnn, QUICK)
        r = stack.client.get(f"/v1/jobs/{job['id']}/report")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert r.headers["referrer-policy"] == "no-referrer"
        assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in r.text
        assert f'content="{job["id"]}"' in r.text and "{{" not in r.text  # the template is filled in
        problem(stack.client.get("/v1/jobs/j_00000000000000000000/report"), 404)
        stack.wait(job["id"], ("succeeded", "failed"))


def test_with_keys_required_the_page_checks_a_key_it_is_sent_and_serves_the_empty_page_without_one(tmp_path, tiny_cnn):
    with stacks.embedded(tmp_path, require_api_keys=True) as stack:
        with session_factory(stack.settings.resolved_database_url)() as session:
            _, a = create_key(session, "team-a")
            _, b = create_key(session, "team-b")
        job = submit(stack.client, tiny_cnn, QUICK, key=a)
        page = f"/v1/jobs/{job['id']}/report"
        keyed = stack.client.get(page, headers={"Authorization": f"Bearer {a}"})
        assert keyed.status_code == 200
        problem(stack.client.get(page, headers={"Authorization": f"Bearer {b}"}), 404)  # another tenant's
        problem(stack.client.get(page, headers={"Authorization": "Bearer nsk_000000000000_" + "x" * 43}), 401)
        plain = stack.client.get(page)  # a browser's navigation: the same page, which holds no job data
        assert plain.status_code == 200
        assert without_nonce(plain) == without_nonce(keyed)
        problem(stack.client.get(f"/v1/jobs/{job['id']}"), 401)  # what the page then reads still needs the key
        as_a = {"Authorization": f"Bearer {a}"}
        until(lambda: stack.client.get(f"/v1/jobs/{job['id']}", headers=as_a).json()["state"] != "queued", "")
        stack.client.post(f"/v1/jobs/{job['id']}/cancel", headers=as_a)  # nothing left running at the end


def without_nonce(r: httpx.Response) -> str:
    """The page with its per-response nonce (the CSP's, in every inline script and style) taken out."""
    match = re.search(r"'nonce-([^']+)'", r.headers["content-security-policy"])
    assert match, r.headers["content-security-policy"]
    return r.text.replace(match.group(1), "")


# --- in the browser -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("chromium and chromedriver are missing: scripts/test installs them (chromium, chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    b = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield b
    finally:
        b.quit()


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[str]:
    with stacks.serve(tmp_path_factory.mktemp("report"), NEURONSHAP_PUBLISH_INTERVAL_S="0.2") as url:
        yield url


def count(browser, selector: str) -> int:
    return browser.execute_script("return document.querySelectorAll(arguments[0]).length", selector)


def text(browser, element_id: str) -> str:
    return browser.execute_script("return document.getElementById(arguments[0]).textContent", element_id)


def loaded(browser) -> bool:
    return browser.execute_script("return document.body.dataset.loaded === 'true'")


def refused(browser) -> list[str]:
    """What the browser refused to load or run (a CSP violation: an asset from elsewhere, an inline script)."""
    return [e["message"] for e in browser.get_log("browser") if "Content Security Policy" in e["message"]]


@pytest.mark.service
@pytest.mark.slow
def test_a_finished_jobs_page_draws_each_neuron_shown_the_threshold_layers_curves_and_edits(
    browser, served, small_cnn, tmp_path
):
    with httpx.Client(base_url=served, timeout=30) as client:
        job = submit(client, small_cnn, FINISHED)
        wait_served(client, job["id"])
        players = client.get(f"/v1/jobs/{job['id']}").json()["progress"]["players"]
        assert players == 56 > 2 * SHOWN
        browser.get(f"{served}/v1/jobs/{job['id']}/report")
        until(lambda: loaded(browser), "the page never finished loading")
        until(lambda: count(browser, "#ablation-plot polyline.curve") > 0, "no ablation curves")

        assert text(browser, "state") == "succeeded"
        for plot in ("neurons-plot", "layers-plot", "ablation-plot"):
            assert browser.find_element("id", plot).is_displayed(), plot
        assert count(browser, "#neurons-plot circle.mark") == 2 * SHOWN  # the top 20 and the bottom 20
        ranks = browser.execute_script(
            "return [...document.querySelectorAll('#neurons-plot circle.mark')].map(m => +m.dataset.rank)"
        )
        assert ranks == list(range(1, SHOWN + 1)) + list(range(players - SHOWN + 1, players + 1))
        assert count(browser, "#neurons-plot line.interval") == 2 * SHOWN  # every interval is finite here
        assert count(browser, "#neurons-plot line.threshold") == 1
        assert "k = 5" in browser.find_element("css selector", "#neurons-plot").text

        layers = client.get(f"/v1/jobs/{job['id']}/importance").json()["layers"]
        rows = browser.execute_script(
            "return [...document.querySelectorAll('#layers-table tbody tr')].map(r => [r.dataset.layer, "
            "+r.cells[1].textContent])"
        )
        assert rows == [[name, len(a["value"])] for name, a in layers.items()]
        assert count(browser, "#layers-plot rect.layer-bar") == len(layers) == 3
        curves = browser.execute_script(
            "return [...document.querySelectorAll('#ablation-plot polyline.curve')].map(c => c.dataset.curve)"
        )
        ablation = client.get(f"/v1/jobs/{job['id']}/ablation").json()
        assert {"top", "bottom", "random"} <= set(curves) and all(name in ablation for name in curves)
        assert browser.execute_script("return document.getElementById('edits-section').hidden")  # no edits
        origins = browser.execute_script(
            "return [...new Set(performance.getEntriesByType('resource').map(e => new URL(e.name).origin))]"
        )
        assert origins == [served]  # nothing from another host
        assert refused(browser) == []

        size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        png = browser.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "clip": clip})
        shot = tmp_path / "report.png"
        shot.write_bytes(base64.b64decode(png["data"]))  # the whole page, not only the window
        assert shot.read_bytes().startswith(b"\x89PNG")
        if target := os.environ.get("NEURONSHAP_REPORT_SCREENSHOT"):
            shutil.copyfile(shot, target)

        # Edits, as GET …/edits answers them (docs/API.md's Edit): one list entry each, before/after per group.
        answer = {"items": [EDIT | {"job_id": job["id"]}], "next_cursor": None}
        script = browser.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument",
            {
                "source": "const realFetch = window.fetch; window.fetch = (url, options) => "
                "String(url).endsWith('/edits') ? Promise.resolve(new Response(JSON.stringify("
                + json.dumps(answer)
                + "), {headers: {'Content-Type': 'application/json'}})) : realFetch(url, options);"
            },
        )
        try:
            browser.refresh()
            until(lambda: count(browser, "#edits .edit") == 1, "the edits were not shown")
        finally:
            browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})
        assert browser.find_element("id", "edits-section").is_displayed()
        figures = browser.execute_script(
            "return [...document.querySelectorAll('#edits tbody tr')].map(r => [...r.cells].map(c => c.textContent))"
        )
        assert figures == [
            ["job's data", "0.910", "0.930", "+0.0200"],
            ["  group 0", "0.990", "0.980", "-0.0100"],
            ["  group 1", "0.800", "0.860", "+0.0600"],
        ]
        assert "1 removed: conv2[17]" in text(browser, "edits")


@pytest.mark.service
@pytest.mark.slow
def test_a_running_jobs_page_follows_its_progress_without_a_reload(browser, served, tiny_cnn):
    with httpx.Client(base_url=served, timeout=30) as client:
        job = submit(client, tiny_cnn, LONG)
        until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["state"] == "running", "the job never ran")
        browser.get(f"{served}/v1/jobs/{job['id']}/report")
        until(lambda: loaded(browser), "the page never finished loading")
        browser.execute_script("window.sameDocument = true")  # gone if the page reloads
        first = until(lambda: text(browser, "p-evaluations").replace("–", ""), "no progress shown")
        until(
            lambda: text(browser, "p-evaluations") not in (first, "–"),
            f"the page still shows {first} evaluations: it does not follow the job",
        )
        until(lambda: count(browser, "#neurons-plot circle.mark") == 10, "the live neurons were never drawn")
        assert text(browser, "state") == "running"

        client.post(f"/v1/jobs/{job['id']}/cancel")
        until(lambda: text(browser, "state") == "cancelled", "the page never showed the cancel")
        assert browser.execute_script("return window.sameDocument === true")
        assert refused(browser) == []


@pytest.mark.service
@pytest.mark.slow
def test_with_keys_required_the_page_takes_its_key_from_the_fragment_or_a_form(browser, tmp_path, tiny_cnn):
    with (
        stacks.serve(tmp_path, NEURONSHAP_REQUIRE_API_KEYS="true") as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        with session_factory(Settings(data_dir=tmp_path).resolved_database_url)() as session:
            _, key = create_key(session, "team-a")
        r = post_job(client, tiny_cnn, QUICK, key=key)
        assert r.status_code == 202, r.text
        job = r.json()
        wait_served(client, job["id"], key)

        browser.get(f"{url}/v1/jobs/{job['id']}/report#key={key}")
        until(lambda: count(browser, "#neurons-plot circle.mark") == 10, "the page did not use the fragment's key")
        assert browser.execute_script("return location.hash") == ""  # the key is out of the address bar

        browser.execute_script("sessionStorage.clear()")
        browser.refresh()
        until(lambda: browser.find_element("id", "key-section").is_displayed(), "the page did not ask for a key")
        assert count(browser, "#neurons-plot circle.mark") == 0
        browser.find_element("id", "key-input").send_keys(key)
        browser.find_element("css selector", "#key-form button").click()
        until(lambda: count(browser, "#neurons-plot circle.mark") == 10, "the page did not use the form's key")
        assert not browser.find_element("id", "key-section").is_displayed()


def wait_served(client: httpx.Client, job_id: str, key: str | None = None) -> None:
    """Wait for the served job to succeed."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    job = until(
        lambda: (
            (j := client.get(f"/v1/jobs/{job_id}", headers=headers).json())["state"]
            in ("succeeded", "failed", "cancelled")
            and j
        ),
        f"job {job_id} did not finish",
        timeout=180,
    )
    assert job["state"] == "succeeded", job["error"]
