"""The Prefect UI end to end, in a real browser: headless Chromium (the Debian package) opens
the `deploy-appliance` run form and a finished deploy run, as a user would.

One `crv up` in a temporary CRV_HOME serves the module; a throw-away one-node appliance is
deployed through the CLI so that a finished `deploy-appliance` flow run with its stage task
runs exists. The Prefect API requires crv's basic auth, so the browser first signs in on the
UI's login page with the auth string (as a user pastes `crv api-credentials --auth-string`).
The browser is driven with Playwright (`executable_path=/usr/bin/chromium`, no
downloaded browser). Full-page screenshots are saved under `$CRV_TEST_ARTIFACTS/browser/`
(default `<repo>/test-artifacts/browser/`): run-form.png and flow-run-task-runs.png, and a
`*-failed.png` of the page when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from tests.conftest import REPO, write_appliance
from tests.test_deploy_e2e import Crv

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
IN_CI = os.environ.get("CI") == "true"


def _unavailable(reason: str) -> NoReturn:
    """Skip here; in CI (CI=true) a missing browser is a failure, not a skip."""
    if IN_CI:
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


try:
    from playwright.sync_api import (
        Browser,
        Locator,
        Page,
        ViewportSize,
        expect,
        sync_playwright,
    )
except ImportError:  # pragma: no cover - depends on the environment
    _unavailable("the browser tests need the Python package playwright (pip install playwright)")

# The SPA loads slowly on a small machine: generous, bounded waits (milliseconds).
UI_TIMEOUT = 30_000
NAVIGATION_TIMEOUT = 60_000
VIEWPORT: ViewportSize = {"width": 1400, "height": 1000}
MAX_SCREENSHOT_HEIGHT = 8_000

CLUSTER = "uibrowser"
TINY = """\
apiVersion: crv/v1
name: uibrowser
nodes:
  box: {count: 1, roles: [svc]}
roles:
  svc: {recipe: svc.sh}
"""
# one task run per stage (docs/deploy.md): step kind x node group (x role)
STAGES = ["provision[box]", "certify[box]", "contextualize[box/svc]", "verify[box/svc]"]


def artifacts_dir() -> Path:
    base = Path(os.environ.get("CRV_TEST_ARTIFACTS") or REPO / "test-artifacts")
    directory = base / "browser"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def screenshot(page: Page, name: str) -> Path:
    """A full-page PNG. The Prefect UI scrolls inside its own container, not the document, so
    the viewport is stretched to the content's height for the shot and then restored."""
    path = artifacts_dir() / name
    height = page.evaluate(
        """() => {
            window.scrollTo(0, 0);
            let height = document.documentElement.scrollHeight;
            for (const e of document.querySelectorAll('*')) {
                if (e.scrollTop) e.scrollTop = 0;
                height = Math.max(height, e.scrollHeight);
            }
            return height;
        }"""
    )
    page.set_viewport_size(
        {"width": VIEWPORT["width"], "height": min(height, MAX_SCREENSHOT_HEIGHT)}
    )
    try:
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(VIEWPORT)
    print(f"screenshot: {path}")
    return path


@contextmanager
def shot_on_failure(page: Page, name: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        try:
            screenshot(page, f"{name}-failed.png")
        except Exception as exc:  # the page may be gone; keep the original error
            print(f"no failure screenshot: {exc}")
        raise


@dataclass
class System:
    crv: Crv
    api: str  # http://127.0.0.1:PORT/api
    ui: str  # the same server without /api

    def get(self, path: str) -> Any:
        r = httpx.get(f"{self.api}{path}", auth=self.crv.prefect_auth, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        r = httpx.post(f"{self.api}{path}", json=body, auth=self.crv.prefect_auth, timeout=30)
        r.raise_for_status()
        return r.json()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        _unavailable(
            f"{CHROMIUM} is missing: install the Debian package chromium (apt-get install chromium)"
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def system(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    """`crv up`, then a finished deploy of a one-node appliance; destroyed and down at the end."""
    c = Crv(tmp_path_factory.mktemp("crv-home"))
    deployed = False
    try:
        c.up()
        api = str(json.loads((c.home / "prefect" / "daemon.json").read_text())["url"])
        assert api.endswith("/api"), api
        app = write_appliance(tmp_path_factory.mktemp("appliances"), CLUSTER, TINY, ("svc.sh",))
        deployed = True  # from here on, destroy at the end (even after a partial deploy)
        r = c("deploy", str(app), "--pool", "local", "--name", CLUSTER)
        assert r.returncode == 0, r.stdout + r.stderr
        yield System(c, api, api.removesuffix("/api"))
    finally:
        try:
            if deployed:
                d = c("destroy", CLUSTER)
                assert d.returncode == 0, d.stdout + d.stderr
        finally:
            for pid in c.node_processes():
                os.kill(pid, signal.SIGKILL)
            c("down")


@contextmanager
def new_page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(UI_TIMEOUT)
    context.set_default_navigation_timeout(NAVIGATION_TIMEOUT)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield pg
    finally:
        if errors:
            print("page errors:", *errors, sep="\n  ")
        context.close()


def sign_in(page: Page, system: System, auth: str, then: str = "/deployments") -> None:
    """Open a UI page: Prefect's UI sends to its login page, whose one field takes the auth
    string (`user:password`); after *Login* it goes on to the page asked for."""
    page.goto(f"{system.ui}{then}")
    expect(page).to_have_url(re.compile(r"/login"), timeout=NAVIGATION_TIMEOUT)
    field = page.get_by_placeholder("admin:pass")
    field.fill(auth)
    field.press("Enter")


@pytest.fixture
def page(browser: Browser, system: System) -> Iterator[Page]:
    """A signed-in page (the UI keeps the credential in the browser's local storage)."""
    with new_page(browser) as pg:
        with shot_on_failure(pg, "login"):
            sign_in(pg, system, ":".join(system.crv.prefect_auth))
            expect(pg).to_have_url(re.compile(r"/deployments$"), timeout=NAVIGATION_TIMEOUT)
        yield pg


def test_the_ui_asks_for_the_auth_string(system: System, browser: Browser) -> None:
    """Without the credential the UI shows only its login page, and a wrong one is refused;
    the right one opens the deployments."""
    with new_page(browser) as pg, shot_on_failure(pg, "login"):
        user, password = system.crv.prefect_auth
        sign_in(pg, system, f"{user}:not-{password}")
        expect(pg.get_by_text("Authentication failed.").first).to_be_visible()
        expect(pg).to_have_url(re.compile(r"/login"))
        sign_in(pg, system, f"{user}:{password}")
        expect(pg).to_have_url(re.compile(r"/deployments$"), timeout=NAVIGATION_TIMEOUT)
        expect(pg.get_by_text("deploy-appliance").first).to_be_visible(timeout=NAVIGATION_TIMEOUT)
        screenshot(pg, "signed-in.png")


def form_property(page: Page, label: str) -> Locator:
    """One field of Prefect's schema form, by its label (`name` or `name (Optional)`)."""
    title = page.locator(
        ".schema-form-property__label",
        has_text=re.compile(rf"^{re.escape(label)}( \(Optional\))?$"),
    )
    return page.locator(".schema-form-property").filter(has=title).first


def open_select(field: Locator) -> None:
    """Open a schema-form select (Prefect's PSelect) from the keyboard: in headless Chromium a
    mouse click on its button does not open the list, ArrowDown does (as for a user)."""
    field.locator("button.p-select-button__control").first.press("ArrowDown")


def test_run_form_offers_the_catalog_and_typed_parameters(system: System, page: Page) -> None:
    deployment = system.get("/deployments/name/deploy-appliance/crv")
    schema = deployment["parameter_openapi_schema"]["properties"]
    appliances = schema["appliance"]["enum"]
    assert "webfarm" in appliances

    page.goto(f"{system.ui}/deployments/deployment/{deployment['id']}/run")
    with shot_on_failure(page, "run-form"):
        expect(page.get_by_text("deploy-appliance").first).to_be_visible(timeout=NAVIGATION_TIMEOUT)
        appliance = form_property(page, "appliance")
        expect(appliance).to_be_visible(timeout=NAVIGATION_TIMEOUT)
        # required: labelled without "(Optional)"; described with the catalog
        expect(appliance.locator(".schema-form-property__label")).to_have_text("appliance")
        expect(appliance).to_contain_text("webfarm (Round-robin load balancer")

        # an enum select whose choices are the catalog's appliances
        open_select(appliance)
        options = page.get_by_role("option")
        expect(options).to_have_text(appliances)
        page.get_by_role("option", name="webfarm", exact=True).click()
        expect(appliance.locator(".p-select-button__value")).to_have_text("webfarm")

        # the pool: a select too, on its default, offering the pools
        pool = form_property(page, "pool")
        expect(pool.locator(".p-select-button__value")).to_have_text(schema["pool"]["default"])
        open_select(pool)
        expect(page.get_by_role("option")).to_have_text(schema["pool"]["enum"])
        page.keyboard.press("Escape")

        # the appliance's parameters and node counts: one described field each
        parameters = form_property(page, "parameters")
        parameters.get_by_role("button", name="set", exact=True).click()
        workers = form_property(page, "workers")
        expect(workers).to_be_visible()
        described = schema["parameters"]["anyOf"][0]["properties"]["workers"]["description"]
        assert "webfarm: integer" in described
        expect(workers).to_contain_text(described)
        expect(form_property(page, "port")).to_contain_text("webfarm: integer 1024..65535")

        counts = form_property(page, "counts")
        counts.get_by_role("button", name="set", exact=True).click()
        worker = form_property(page, "worker")
        expect(worker).to_be_visible()
        expect(worker).to_contain_text(
            schema["counts"]["anyOf"][0]["properties"]["worker"]["description"]
        )
        expect(worker).to_contain_text("roles web")

        # plain typed fields: numbers on their defaults
        for name in ("boot_timeout", "retries"):
            box = form_property(page, name).locator("input[type=number]")
            expect(box).to_have_value(f"{schema[name]['default']:g}")

        expect(page.get_by_role("button", name="Submit")).to_be_visible()
    screenshot(page, "run-form.png")  # not submitted: no run is created


def test_finished_deploy_run_shows_its_stage_task_runs(system: System, page: Page) -> None:
    runs = system.post(
        "/flow_runs/filter",
        {
            "flows": {"name": {"any_": ["deploy-appliance"]}},
            "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
            "sort": "START_TIME_DESC",
            "limit": 50,
        },
    )
    run = next((r for r in runs if r["parameters"].get("name") == CLUSTER), None)
    assert run is not None, f"no completed deploy-appliance run for {CLUSTER}: {runs}"
    task_runs = system.post(
        "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}, "limit": 200}
    )
    assert sorted(t["name"] for t in task_runs) == sorted(STAGES)

    page.goto(f"{system.ui}/runs/flow-run/{run['id']}")
    with shot_on_failure(page, "flow-run-task-runs"):
        expect(page.get_by_text(run["name"], exact=True).first).to_be_visible(
            timeout=NAVIGATION_TIMEOUT
        )
        expect(page.get_by_text("deploy-appliance").first).to_be_visible()
        expect(page.get_by_text(f"{len(STAGES)} Task runs").first).to_be_visible()

        page.locator("li.p-tab", has_text=re.compile(r"^Task Runs$")).click()
        expect(page).to_have_url(re.compile(r"[?&]tab=Task\+Runs"))
        items = page.locator(".task-run-list-item")
        expect(items).to_have_count(len(STAGES))
        for stage in STAGES:
            item = items.filter(has=page.get_by_role("link", name=stage, exact=True))
            expect(item).to_be_visible()
            expect(item).to_contain_text("Completed")
            expect(item.get_by_role("link", name=stage, exact=True)).to_have_attribute(
                "href", re.compile(r"^/runs/task-run/[0-9a-f-]{36}$")
            )
    screenshot(page, "flow-run-task-runs.png")
