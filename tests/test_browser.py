"""The report as a person sees it: opened in a real headless Chromium, offline.

Chromium and ChromeDriver come from Debian's packages (chromium,
chromium-driver), which `make test` installs when it can. Where they cannot be
installed the test is skipped and says why.
"""

import json
import shutil

import pandas as pd
import pytest

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Chromium/ChromeDriver not installed (Debian packages chromium, "
                    "chromium-driver; `make test` installs them as root with apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    # Network off: the report must need nothing from outside its own file.
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    yield driver
    driver.quit()


def test_report_renders_offline_with_its_numbers(browser, workflow_run):
    workdir, _ = workflow_run
    report = workdir / "results" / "report.html"
    browser.get(report.as_uri())
    state = browser.execute_script("return document.readyState")
    assert state == "complete"
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
    from kdflow.analysis.figures import shown
    assert len(images) == len(shown(1, True))  # one setting: no study figures
    for alt, complete, width in images:
        assert complete and width > 0, f"image {alt!r} did not load"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors

    arms = pd.read_csv(workdir / "results/summary/arms.csv").set_index("arm")
    head = json.loads((workdir / "results/summary/headline.json").read_text())
    text = lambda css: browser.find_element("css selector", css).text.strip()  # noqa: E731
    for role, arm in head["arms"].items():  # the headline's three arms
        assert text(f"#acc-{role}") == f"{100 * arms.loc[arm, 'accuracy_mean']:.2f}%"
    assert text("#kd-gain") == f"{100 * head['gain_mean']:+.2f} pts"

    shot = workdir / "results" / "report-screenshot.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
