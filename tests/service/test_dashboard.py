"""The dashboard in a real browser (Debian's Chromium, driven by Playwright) against a real stack:
gateway with keys required, Celery worker, Postgres, Redis and S3. Screenshots of every page go to
$NNM_TEST_OUTPUT/dashboard (default: test-output/dashboard at the repository root)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from nnm.service.auth import KeyStore
from nnm.service.store.migrations import upgrade
from nnm.service.store.repository import JobStore
from playwright.sync_api import expect, sync_playwright

from .conftest import digit_png, digits_zip
from .servers import REPO, postgres_database, redis_database, start_gateway, start_worker, stop

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("NNM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(os.environ.get("NNM_TEST_OUTPUT", REPO / "test-output")) / "dashboard"


@pytest.fixture(scope="module")
def stack(service_env, infra, tmp_path_factory):
    """Its own database and broker: a gateway that requires keys, one worker, keys for two users."""
    root = tmp_path_factory.mktemp("dashboard")
    with postgres_database() as url, redis_database() as broker:
        upgrade(url)
        jobs = JobStore(url)
        keys = KeyStore(jobs)
        alice, _ = keys.create("alice", ["read", "write"])
        bob, _ = keys.create("bob", ["read", "write"])
        env = {**service_env, "NNM_DATABASE_URL": url, "NNM_BROKER_URL": broker, "NNM_AUTH": "required",
               "NNM_DATA_DIR": str(root / "data")}
        gateway, base = start_gateway(env, root / "gateway.log")
        worker = start_worker(env, root / "worker.log", name="dash")
        try:
            yield {"base": base, "alice": alice, "bob": bob, "root": root}
        finally:
            stop(worker, timeout=60)
            stop(gateway)
            jobs.dispose()


@pytest.fixture(scope="module")
def browser():

    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: scripts/test.sh installs Debian's chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def http(stack, key: str) -> httpx.Client:
    return httpx.Client(base_url=stack["base"], headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_pages_are_served_with_a_strict_content_security_policy(stack):
    r = httpx.get(f"{stack['base']}/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    page = httpx.get(f"{stack['base']}/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    js = httpx.get(f"{stack['base']}/ui/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    # The page itself holds no data and no key; the API behind it still asks for one.
    assert "nnm_" not in page.text and httpx.get(f"{stack['base']}/v1/jobs").status_code == 401
    assert httpx.get(f"{stack['base']}/ui/../v1/jobs").status_code == 401


def _labelled(page) -> list[str]:
    """Form controls in the page without an accessible name (an empty list is the goal)."""
    return page.evaluate("""() => [...document.querySelectorAll('main input, main select, main button')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
        .map(el => el.outerHTML.slice(0, 80))""")


def test_dashboard_in_a_real_browser(stack, browser, tmp_path):
    SHOTS.mkdir(parents=True, exist_ok=True)
    (tmp_path / "digits-960.zip").write_bytes(digits_zip(960))
    for i in (3, 7):
        (tmp_path / f"digit{i}.png").write_bytes(digit_png(i))
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    def console(m) -> None:
        # The browser logs every 4xx answer as an error; those are checked where they are expected.
        if m.type == "error" and "Failed to load resource" not in m.text:
            problems.append(m.text)

    page.on("console", console)

    def shot(name: str) -> None:
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    # The key, asked once, typed and submitted from the keyboard.
    page.goto(f"{stack['base']}/")
    page.wait_for_url("**/ui/**")
    key_field = page.get_by_label("API key")
    key_field.wait_for()
    assert _labelled(page) == []
    shot("01-key")
    key_field.type(stack["alice"])
    page.keyboard.press("Enter")
    page.get_by_role("heading", name="Jobs").wait_for()
    assert stack["alice"] not in page.url
    assert page.evaluate("sessionStorage.getItem('nnm.apiKey')") == stack["alice"]

    # Upload the digits zip and see it checked.
    page.get_by_role("link", name="Datasets").click()
    page.get_by_label("Zip of images (a folder per class, or flat)").set_input_files(tmp_path / "digits-960.zip")
    page.get_by_label("Name").fill("digits-960")
    page.get_by_role("button", name="Upload").click()
    page.get_by_text("Checked: 960 images").wait_for(timeout=120_000)
    row = page.locator("tbody tr", has_text="digits-960")
    expect(row).to_have_count(1)  # the list is reloaded after the upload
    row.locator("td.protos img").nth(7).wait_for()  # its preview: the first image of 8 class folders
    assert row.locator("td.protos img").count() == 8
    assert _labelled(page) == []
    shot("02-datasets")

    # Start a quick pipeline on it, and a second one that is cancelled while it waits.
    page.locator("tbody tr", has_text="digits-960").get_by_role("link", name="train on it").click()
    page.get_by_label("Preset").select_option("quick")
    page.get_by_label("Clusters").fill("10")
    page.get_by_label("More settings (JSON)").fill('{"pretext": {"epochs": 12, "batch_size": 64}}')
    assert _labelled(page) == []
    start = page.get_by_role("button", name="Start pipeline")
    start.click()
    # (expect() rather than wait_for_function: the page's CSP forbids the eval that the latter needs)
    jobs = page.locator("tbody tr[data-job]")
    expect(jobs).to_have_count(1)  # the list is reloaded after the answer: wait for the job's row
    first = jobs.first.get_attribute("data-job")
    assert first and first in page.locator("#status").inner_text()  # "Job <id> queued."
    page.get_by_label("Clusters").fill("auto")  # the second one asks for an estimated number of clusters
    start.click()
    expect(jobs).to_have_count(2)
    second = jobs.first.get_attribute("data-job")  # newest first
    assert second and second != first
    page.get_by_role("button", name=f"Cancel job {second}").click()
    page.locator(f"tr[data-job='{second}'] .badge", has_text="cancelled").wait_for(timeout=60_000)

    # Watch the first job's progress bar move and reach the end.
    bar = page.locator(f"tr[data-job='{first}'] [role=progressbar]")
    seen: set[int] = set()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = page.locator(f"tr[data-job='{first}'] .badge").inner_text()
        if bar.count():
            seen.add(int(bar.get_attribute("aria-valuenow")))
        if status in {"succeeded", "failed", "cancelled"}:
            break
        if len(seen) == 2:
            shot("03-jobs-running")
        time.sleep(0.4)
    assert status == "succeeded"
    assert int(bar.get_attribute("aria-valuenow")) == 100
    assert any(0 < v < 100 for v in seen), seen
    shot("04-jobs-done")

    # The job: stage timeline, metrics, loss curves, confusion matrix, downloads.
    page.get_by_role("link", name=first[:12]).click()
    page.locator("#metrics").wait_for()
    stages = [t.split()[0] for t in page.locator(".timeline li").all_inner_texts()]
    assert stages == ["pretext", "mine", "cluster", "selflabel", "evaluate"]
    assert page.locator(".timeline li .took").count() == 5  # each with its duration
    assert "ACC" in page.locator("#metrics").inner_text()
    page.locator("figure.chart").nth(2).wait_for()
    assert page.locator("figure.chart").count() == 3
    cells = page.locator("#confusion tbody td")
    cells.nth(99).wait_for()
    assert cells.count() == 100
    assert page.locator("#confusion tbody td").first.get_attribute("title").startswith("true 0, predicted 0:")
    cells.first.hover()
    shot("05-job")
    with page.expect_download() as got:
        page.get_by_role("button", name="metrics.json").click()
    metrics = json.loads(Path(got.value.path()).read_text())
    api = http(stack, stack["alice"])
    job = api.get(f"/v1/jobs/{first}").json()
    assert metrics["acc"] == job["metrics"]["acc"]
    assert job["config"]["pretext"]["epochs"] == 12 and job["config"]["cluster"]["clusters"] == 10
    assert api.get(f"/v1/jobs/{second}").json()["config"]["cluster"]["clusters"] == "auto"

    # The cluster browser: every cluster, then the biggest one paged, then an image's neighbours.
    page.locator("#browse-clusters").click()
    page.locator(".cluster-card").nth(9).wait_for()
    assert page.locator(".cluster-card").count() == 10
    shot("06-clusters")
    clusters = api.get(f"/v1/jobs/{first}/clusters", params={"thumbnails": "false"}).json()["clusters"]
    big = max(clusters, key=lambda c: c["size"])
    assert big["size"] > 48
    page.locator(f"a.cluster-card[href$='/clusters/{big['cluster']}']").click()
    page.locator("#members .thumb").nth(47).wait_for()
    assert page.locator("#members .thumb").count() == 48
    assert page.locator("#page-info").inner_text() == f"images 1–48 of {big['size']}"
    assert page.locator("#members img").first.get_attribute("src").startswith("data:image/png;base64,")
    assert page.locator("#prototypes .thumb").count() == len(big["prototypes"])
    shot("07-cluster")
    page.get_by_role("link", name="next →").click()
    expect(page.locator("#page-info")).to_have_text(re.compile(r"^images 49–"))
    shot("08-cluster-page-2")
    # From the keyboard: an image is a button; Enter opens its neighbours, Escape closes them.
    page.locator("#members .thumb").first.focus()
    page.keyboard.press("Enter")
    dialog = page.locator("dialog#neighbours")
    dialog.wait_for()
    index = int(page.locator("#members .thumb").first.get_attribute("data-index"))
    detail = api.get(f"/v1/jobs/{first}/images/{index}", params={"thumbnails": "false"}).json()
    assert len(detail["neighbors"]) == 10
    assert dialog.locator(".thumb").count() == 1 + 10
    assert [int(x) for x in dialog.locator(".thumb").evaluate_all("els => els.map(e => e.dataset.index)")][1:] == [
        n["index"] for n in detail["neighbors"]]
    shot("09-neighbours")
    page.keyboard.press("Escape")
    dialog.wait_for(state="detached")

    # Assign two images: each one's cluster and confidence, with its cluster's prototypes.
    page.get_by_role("link", name="Assign").click()
    page.get_by_label("Drop images here, or choose them:").set_input_files(
        [tmp_path / "digit3.png", tmp_path / "digit7.png"])
    assert _labelled(page) == []
    rows = page.locator(".assign-row")
    rows.nth(1).wait_for()
    assert rows.count() == 2
    expected = api.post(f"/v1/models/{job['model_id']}/assign",
                        files=[("files", (f"digit{i}.png", digit_png(i), "image/png")) for i in (3, 7)]).json()
    for row, want in zip(rows.all(), expected, strict=True):
        assert f"cluster {want['cluster']} · confidence {want['confidence']:.2f}" in row.inner_text()
        assert row.locator(".protos img").count() == len(clusters[want["cluster"]]["prototypes"])
    shot("10-assign")

    # A job whose number of clusters was estimated shows the estimate and its curve over K.
    params = {"preset": "quick", "pretext": {"epochs": 4, "batch_size": 64}, "selflabel": {"enabled": False},
              "cluster": {"epochs": 1, "clusters": "auto"}, "estimate": {"max_clusters": 16}}
    body = {"type": "pipeline", "dataset_id": job["dataset_id"], "params": params}
    auto = api.post("/v1/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 600
    while api.get(f"/v1/jobs/{auto}").json()["status"] not in {"succeeded", "failed", "cancelled"}:
        assert time.monotonic() < deadline
        time.sleep(1)
    est = json.loads(api.get(f"/v1/jobs/{auto}/artifacts/estimate/estimate.json").content)
    page.goto(f"{stack['base']}/ui/#/jobs/{auto}")
    section = page.locator("#estimate")
    expect(section).to_contain_text(f"Estimated {est['clusters']} clusters without labels (modularity, searched 2–16)")
    assert section.locator("svg circle").count() == 1  # the choice, marked on the curve
    assert section.locator("svg").get_attribute("aria-label") == "Number of clusters: modularity over K"
    assert f"{est['clusters']} by modularity" in page.locator("#metrics").inner_text()
    shot("10b-estimate")
    page.get_by_role("link", name="Assign").click()
    page.get_by_label("Drop images here, or choose them:").wait_for()
    assert problems == []

    # Another user's key sees none of it.
    page.get_by_role("button", name="Forget key").click()
    page.get_by_label("API key").fill(stack["bob"])
    page.get_by_role("button", name="Continue").click()
    page.get_by_text("No trained model yet").wait_for()  # back on the page it was on: Assign
    page.get_by_role("link", name="Jobs").click()
    page.get_by_text("No jobs yet.").wait_for()
    page.get_by_role("link", name="Datasets").click()
    page.get_by_text("No data sets yet.").wait_for()
    page.goto(f"{stack['base']}/ui/#/jobs/{first}/clusters")
    page.get_by_text(f"404: no job '{first}'").wait_for()
    assert page.get_by_role("heading", name="Not found").is_visible()  # not the previous page with a banner
    shot("11-foreign-key")
    context.close()


def test_cluster_api_pages_every_image_once_and_hides_other_users_jobs(stack):
    """The data behind the browser, for scripts: values checked against the job's own artifacts."""
    alice, bob = http(stack, stack["alice"]), http(stack, stack["bob"])
    r = alice.post("/v1/datasets", files={"file": ("d.zip", digits_zip(300), "application/zip")})
    assert r.status_code == 201, r.text
    dataset_id = r.json()["id"]
    preview = alice.get(f"/v1/datasets/{dataset_id}/preview").json()["images"]
    assert [p["name"].split("/")[-2] for p in preview] == [str(c) for c in range(8)]  # one per class first
    assert all(p["thumbnail"].startswith("data:image/png;base64,") for p in preview)
    assert bob.get(f"/v1/datasets/{dataset_id}/preview").status_code == 404
    builtin = alice.post("/v1/datasets", json={"builtin": "digits"}).json()
    assert alice.get(f"/v1/datasets/{builtin['id']}/preview").json()["type"] == "urn:nnm:problem:no-preview"
    r = alice.post("/v1/jobs", json={"type": "pipeline", "dataset_id": dataset_id, "params": {"preset": "quick"}})
    job_id = r.json()["id"]
    deadline = time.monotonic() + 600
    while (job := alice.get(f"/v1/jobs/{job_id}").json())["status"] not in {"succeeded", "failed", "cancelled"}:
        assert time.monotonic() < deadline
        time.sleep(1)
    assert job["status"] == "succeeded", job["error"]
    overview = alice.get(f"/v1/jobs/{job_id}/clusters").json()
    assert overview["num_images"] == 300 and len(overview["clusters"]) == 10
    assert overview["class_names"] == [str(i) for i in range(10)]
    assignments = {}
    for line in alice.get(f"/v1/jobs/{job_id}/artifacts/assignments.csv").text.splitlines()[1:]:
        name, cluster, conf, _ = line.split(",")
        assignments[name] = (int(cluster), float(conf))
    seen = []
    for c in overview["clusters"]:
        offset, got = 0, []
        while offset is not None:
            page = alice.get(f"/v1/jobs/{job_id}/clusters/{c['cluster']}/images",
                             params={"offset": offset, "limit": 7, "thumbnails": "false"}).json()
            got += page["items"]
            offset = page["next_offset"]
        assert len(got) == c["size"] == page["total"]
        confidences = [g["confidence"] for g in got]
        assert confidences == sorted(confidences, reverse=True)
        for g in got:
            assert assignments[g["name"]] == (c["cluster"], pytest.approx(g["confidence"], abs=1e-4))
            assert g["label"] == g["name"].split("/")[-2]  # the class folder
        if c["size"]:
            labels = [g["label"] for g in got]
            top = max(set(labels), key=labels.count)
            assert c["purity"] == pytest.approx(labels.count(top) / len(labels), abs=1e-4)
        seen += [g["index"] for g in got]
    assert sorted(seen) == list(range(300))
    # An image's neighbours are the first 10 mined ones.
    mined = np.load(io.BytesIO(alice.get(f"/v1/jobs/{job_id}/artifacts/mine/neighbors.npy").content))
    detail = alice.get(f"/v1/jobs/{job_id}/images/17").json()
    assert [n["index"] for n in detail["neighbors"]] == mined[17, 1:11].tolist()  # itself excluded
    assert detail["image"]["thumbnail"].startswith("data:image/png;base64,")
    # Bad paging and out-of-range numbers are problems, not crashes; another user's key sees nothing.
    for path, status in ((f"/v1/jobs/{job_id}/clusters/10/images", 404), (f"/v1/jobs/{job_id}/images/300", 404),
                         (f"/v1/jobs/{job_id}/clusters/0/images?limit=0", 422),
                         (f"/v1/jobs/{job_id}/clusters/-1/images", 422),
                         (f"/v1/jobs/{job_id}/images/99999999999999999999999", 404)):
        r = alice.get(path)
        assert r.status_code == status, (path, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    for path in (f"/v1/jobs/{job_id}/clusters", f"/v1/jobs/{job_id}/clusters/0/images", f"/v1/jobs/{job_id}/images/0"):
        r = bob.get(path)
        assert r.status_code == 404 and r.json()["detail"] == f"no job '{job_id}'"  # as if it did not exist
    # A job without a gallery (a pretext job) says so.
    pretext = alice.post("/v1/jobs", json={"type": "pretext", "dataset_id": job["dataset_id"],
                                           "params": {"preset": "quick", "pretext": {"epochs": 1}}}).json()
    r = alice.get(f"/v1/jobs/{pretext['id']}/clusters")
    assert r.status_code == 404 and r.json()["type"] == "urn:nnm:problem:no-gallery"
    # Deleting the job forgets its gallery.
    assert alice.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert alice.get(f"/v1/jobs/{job_id}/clusters").status_code == 404
    assert not list((stack["root"] / "data").glob(f"**/galleries/{job_id}"))
