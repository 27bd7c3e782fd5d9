"""The page at ``/``: every asset comes from the server (in-process), and a real headless browser (Debian's
chromium and chromium-driver, through selenium) uploads a bundled sample and reads the label the server gave it.
The browser test is skipped, with the reason, where no browser is installed; its screenshot is kept in
``test-artifacts/`` (``RIDE_TEST_ARTIFACTS`` elsewhere)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from service.api import create_app
from service.settings import Settings
from tests.server_process import REPO_ROOT, ServerProcess
from tests.service.test_docs import page_and_assets

SAMPLES = REPO_ROOT / "models" / "samples"
ARTIFACTS = Path(os.environ.get("RIDE_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))


def test_page_loads_every_asset_from_this_server(loaded_model, model_dir: Path) -> None:
    html, assets, _ = page_and_assets(create_app(Settings(model_dir=model_dir), model=loaded_model), "/")
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in html.headers["content-security-policy"]
    assert set(assets) >= {"/static/page.js", "/static/page.css", "/static/favicon.svg"}
    for url, asset in assets.items():
        assert asset is not None, f"/ loads {url} from elsewhere"
        assert asset.status_code == 200 and asset.content, url
    script = assets["/static/page.js"].text
    assert not re.search(r"https?://", script), "the script reaches out of this server"


def browser():
    """A headless chromium driven by chromium-driver, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip(
            "no browser: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(argument)
    # The explicit driver path keeps Selenium Manager from looking for one online.
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))


def test_a_browser_classifies_a_bundled_sample(server: ServerProcess) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    samples = [SAMPLES / "horse.jpg", SAMPLES / "ship.jpg"]
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        expected = [
            client.post("/classify", content=path.read_bytes(), headers={"content-type": "image/jpeg"}).json()
            for path in samples
        ]
    driver = browser()
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: "experts" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "file").send_keys(str(samples[0]))
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".result .label")))
        (result,) = driver.find_elements(By.CSS_SELECTOR, ".result")
        assert result.find_element(By.CSS_SELECTOR, ".label").text == expected[0]["label"]
        meta = result.find_element(By.CSS_SELECTOR, ".meta").text
        assert f"experts used: {expected[0]['experts_used']} of {expected[0]['num_experts']}" in meta
        assert "compute saved" in meta and "round trip" in meta
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "page.png"))
        # Two files at once: one batch request, one result each (the newest on top). A file input keeps what it
        # had: clear() empties it first.
        chooser = driver.find_element(By.ID, "file")
        chooser.clear()
        chooser.send_keys("\n".join(str(path) for path in samples))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result")) == 3)
        labels = [node.text for node in driver.find_elements(By.CSS_SELECTOR, ".result .label")]
        assert sorted(labels[:2]) == sorted(answer["label"] for answer in expected)
        assert driver.save_screenshot(str(ARTIFACTS / "page-batch.png"))
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()
