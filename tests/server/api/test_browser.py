"""The dashboard in a real headless Chromium (Debian's chromium, driven by Playwright): fill
the learning form, submit, watch the run page update through its rounds, open the bundle
page and see "verified". Saves a screenshot (docs/img/dashboard.png when
FEDBRAIN_SCREENSHOTS=docs/img, else under the test's tmp folder)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.api.app import ApiSettings, create_app
from tests.server.api.conftest import TEMPLATE
from tests.server.api.live import serving
from tests.server.postgres import missing

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[object]:
    if not Path(CHROMIUM).is_file():
        missing("Chromium (Debian package chromium)")
    playwright_sync = pytest.importorskip("playwright.sync_api")
    with playwright_sync.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 1500},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def test_learning_form_to_verified_bundle_in_the_browser(
    browser_page: object, tmp_path: Path
) -> None:
    from playwright.sync_api import Page, expect

    page: Page = browser_page  # type: ignore[assignment]
    app = create_app(
        ApiSettings(
            database_url=f"sqlite:///{tmp_path / 'api.sqlite'}",
            data_dir=tmp_path / "data",
            worker={"scenario_template": TEMPLATE},
        )
    )
    _, key = app.state.fedbrain.keys.create(name="browser", role="operator", created_by="test")
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    with serving(app) as url:
        page.goto(f"{url}/#/form")
        page.fill("#api-key", key)
        page.click("#key-form button")
        expect(page.locator("#whoami")).to_have_text("browser (operator)")
        page.select_option("#target", label="vit-base16-embed-v1: vision / vit-base16 / embed")
        # a wrong value first: live validation names the field
        page.fill("[name=epochs]", "2.5")
        expect(page.locator('[data-error="epochs"]')).to_contain_text("whole number")
        for name, value in {
            "embedding_dim": "16",
            "hidden_size": "16",
            "num_layers": "1",
            "num_heads": "2",
            "input_size": "32",
            "batch_size": "16",
            "epochs": "3",
            "federation.num_rounds": "3",
            "federation.reliability_threshold": "0",
            "secagg.quantization_range": "4",
        }.items():
            page.fill(f"[name='{name}']", value)
        page.select_option("[name=privacy_level]", "secure-agg")
        expect(page.locator("#preview-name")).to_have_text("vision-vit-base16-embed-v1")
        expect(page.locator("#preview-hash")).to_contain_text("sha256:")
        page.click("#submit")
        expect(page.locator("#job-status")).to_be_visible()
        # record every rounds count the run page shows while it updates
        page.evaluate(
            """() => { window.__seen = [];
              new MutationObserver(() => { const run = document.querySelector('#run');
                if (run && run.dataset.rounds) window.__seen.push(run.dataset.rounds); })
              .observe(document.body, {subtree: true, childList: true, attributes: true}); }"""
        )
        expect(page.locator("#job-status")).to_have_text("succeeded", timeout=150_000)
        expect(page.locator("#run")).to_have_attribute("data-rounds", "3", timeout=20_000)
        seen = {int(v) for v in page.evaluate("window.__seen")}
        assert 3 in seen and len(seen) >= 2, seen  # it updated before the last round
        assert page.locator("#rounds tbody tr").count() == 3
        assert page.locator("#charts canvas").count() >= 4
        shot = tmp_path / "run.png"
        page.screenshot(path=str(shot), full_page=True)
        page.click("#bundle-link")
        expect(page.locator("#verification .verified")).to_have_text("verified", timeout=20_000)
        bundle_shot = tmp_path / "bundle.png"
        page.screenshot(path=str(bundle_shot))
    assert not errors, errors
    target = os.environ.get("FEDBRAIN_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / "dashboard.png")
        shutil.copy(bundle_shot, Path(target) / "bundle.png")
