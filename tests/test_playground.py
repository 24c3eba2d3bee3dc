"""The playground page in a real headless browser (Debian's chromium and chromedriver, through
selenium): load it, type a prime, generate, watch the text arrive, switch to the surprise view and
hover a character. Skips where no browser is installed (.ci/run installs one).

The screenshots go to the test's temporary folder, or to ``CHARLM_SCREENSHOTS`` when set; the
README's come from ``CHARLM_PLAYGROUND_CHECKPOINT=<a trained run> CHARLM_SCREENSHOTS=docs pytest
tests/test_playground.py``, which drives the same page over that model instead of the tests' tiny one.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")

import charlm  # noqa: E402
from serving import Server  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.browser,  # the fast tier (-m 'not slow') leaves these out: conftest.py
              pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver "
                                                                   "(apt-get install chromium chromium-driver)")]


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    # As root in a container, with no network: no sandbox, no GPU, and none of Chromium's own
    # background connections (refused here, many at a time).
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1100,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_generate_then_see_the_surprise_view(browser, trained_run, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    checkpoint = Path(os.environ.get("CHARLM_PLAYGROUND_CHECKPOINT", trained_run))
    shots = Path(os.environ.get("CHARLM_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    prime, length, seed = "First Citizen:\n", 240, 7
    expected = "".join(charlm.load(checkpoint).generate(prime, length=length, temperature=0.8, seed=seed))
    server = Server(checkpoint, "--workers", "2")
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"http://127.0.0.1:{server.port}/")
        find = browser.find_element
        wait.until(lambda d: "parameters" in find(By.ID, "model").text)
        assert "LSTM" in find(By.ID, "model").text
        find(By.ID, "prime").send_keys(prime)
        for field, value in (("length", length), ("seed", seed)):
            find(By.ID, field).clear()
            find(By.ID, field).send_keys(str(value))
        find(By.ID, "generate").click()
        wait.until(lambda d: "pieces in" in find(By.ID, "status").text or "error" in find(By.ID, "status")
                   .get_attribute("class"))
        assert "pieces in" in find(By.ID, "status").text, find(By.ID, "status").text
        shown = browser.execute_script("return document.getElementById('output-generated').textContent")
        assert shown == expected  # the streamed text is the model's, piece for piece
        assert browser.execute_script("return document.getElementById('output-prime').textContent") == prime
        browser.save_screenshot(str(shots / "playground-text.png"))

        find(By.ID, "tab-surprise").click()
        assert find(By.ID, "text-view").get_attribute("hidden") is not None
        wait.until(lambda d: "bits/char" in find(By.ID, "summary").text)
        spans = find(By.ID, "shaded").find_elements(By.TAG_NAME, "span")
        assert "".join(span.get_attribute("textContent") for span in spans) == prime + expected
        colours = {span.value_of_css_property("background-color") for span in spans[1:]}
        assert len(colours) > 5  # shaded by surprise, not one colour
        ActionChains(browser).move_to_element(spans[len(prime) + 3]).perform()
        tip = find(By.ID, "tip")
        wait.until(lambda d: tip.is_displayed())
        assert "bits" in tip.text and "the model expected" in tip.text
        assert len(tip.find_elements(By.TAG_NAME, "tr")) == 5
        browser.save_screenshot(str(shots / "playground-surprise.png"))
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors  # nothing blocked (CSP), nothing failed to load
    finally:
        server.stop()


def test_the_page_asks_once_for_the_servers_api_key(browser, trained_run):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    server = Server(trained_run, "--api-key", "s3cret")
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"http://127.0.0.1:{server.port}/")
        wait.until(expected_conditions.alert_is_present())
        browser.switch_to.alert.send_keys("s3cret")
        browser.switch_to.alert.accept()
        wait.until(lambda d: "parameters" in d.find_element(By.ID, "model").text)
        find = browser.find_element
        find(By.ID, "length").clear()
        find(By.ID, "length").send_keys("30")
        find(By.ID, "generate").click()  # the key is kept: no second question
        wait.until(lambda d: "pieces in" in find(By.ID, "status").text)
    finally:
        server.stop()
