"""What the browser scripts share: a headless Chromium over WebDriver,
waiting for what a page shows, screenshots (to OMOI_ARTEFACTS), and
running steps that each print `ok <step>` when they pass."""

import os
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service

ARTEFACTS = os.environ["OMOI_ARTEFACTS"]
WAIT = float(os.environ.get("OMOI_BROWSER_WAIT_SECONDS", "90"))


def driver():
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("OMOI_CHROMIUM", "/usr/bin/chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1000",
                "--disable-gpu", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    service = Service(executable_path=os.environ.get("OMOI_CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def until(what, check, within=WAIT):
    """Polls check() until it returns something truthy; fails naming `what`."""
    deadline = time.monotonic() + within
    last = None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except (StaleElementReferenceException, WebDriverException) as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


def click(d, what, selector):
    """Clicks the first element `selector` finds, again if the page redrew
    it meanwhile (pages redraw on every event: a found element may be stale
    by the time it is clicked)."""
    from selenium.webdriver.common.by import By

    def go():
        found = d.find_elements(By.CSS_SELECTOR, selector)
        if found:
            found[0].click()
        return bool(found)
    until(what, go)


def shot(d, name):
    path = os.path.join(ARTEFACTS, f"{name}.png")
    d.save_screenshot(path)
    print(f"screenshot {path}")


def run_steps(steps):
    """Runs each step(driver) in order: `ok <name>` when it passed; a
    screenshot and the page's console log when it did not."""
    os.makedirs(ARTEFACTS, exist_ok=True)
    d = driver()
    try:
        for step in steps:
            try:
                step(d)
            except Exception:
                shot(d, f"failed-{step.__name__}")
                try:
                    print("browser console log:", d.get_log("browser"), file=sys.stderr)
                except WebDriverException:
                    pass
                raise
            print(f"ok {step.__name__}")
    finally:
        d.quit()
