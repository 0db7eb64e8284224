"""End to end in a real browser: serve the dashboard, log in, open the first flagged study, agree.

That study's tags carry HTML and Markdown pointing at a local HTTP server: the browser must
never request it (issue 14 item 16), and its file name, a Markdown link, must not become one.

Headless Debian Chromium driven by Selenium through /usr/bin/chromedriver (nothing is downloaded).
Screenshots of each page land in ``<pytest tmp>/artifacts`` (or ``$CXR_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import http.server
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the dashboard extra is not installed: pip install -e '.[dashboard]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install -e '.[dev]'")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tests.test_dashboard import PASSWORD, build_store, decision, sample  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
START_DEADLINE_S = 60
WAIT_S = 30

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                       reason="Chromium or chromedriver is absent: install the Debian packages chromium and "
                              "chromium-driver (scripts/test.sh does when run as root)"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def beacon() -> Iterator[tuple[str, list[str]]]:
    """(URL, paths requested so far) of an HTTP server on 127.0.0.1 that records every request."""
    requested: list[str] = []

    class Record(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Record)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requested
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(tmp_path: Path, beacon: tuple[str, list[str]]) -> Iterator[tuple[str, Path]]:
    """(URL, audit store) of `cxr-triage dashboard` serving a small store on a free 127.0.0.1 port; its riskiest
    study (decision 7) has HTML and Markdown pointing at ``beacon`` in its tags, and a file name like a link."""
    beacon_url = beacon[0]
    rigged = tmp_path / "[re-login](http:evil).dcm"
    shutil.copy(sample(6), rigged)
    db = build_store(tmp_path, (decision(6, 0.99999, True, path=str(rigged),
                                         manufacturer=f"<img src={beacon_url}/tag.png>",
                                         view_position=f"![x]({beacon_url}/markdown.png)"),))
    port = free_port()
    log = open(tmp_path / "streamlit.log", "wb")
    command = [sys.executable, "-c", "import sys; from deploy.cli import main; sys.exit(main())", "dashboard",
               "--audit-db", str(db), "--port", str(port)]
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false", "HOME": str(tmp_path)}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                    if answer.read() == b"ok":
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the dashboard did not start within {START_DEADLINE_S} s: "
                            f"{(tmp_path / 'streamlit.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield url, db
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the group we started: the CLI and its streamlit child
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator["webdriver.Chrome"]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def click_button(driver, label: str) -> None:
    xpath = f"//button[normalize-space()='{label}' or .//p[normalize-space()='{label}']]"  # label, then key hint
    WebDriverWait(driver, WAIT_S).until(EC.element_to_be_clickable((By.XPATH, xpath))).click()


def wait_text(driver, text: str) -> None:
    WebDriverWait(driver, WAIT_S).until(
        EC.presence_of_element_located((By.XPATH, f"//*[contains(normalize-space(text()), '{text}')]")))


def test_login_open_first_flagged_study_and_agree(served: tuple[str, Path], browser, tmp_path: Path,
                                                  beacon: tuple[str, list[str]]) -> None:
    url, db = served
    artifacts = Path(os.environ.get("CXR_TEST_ARTIFACTS") or tmp_path / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.get(url)
    name = WebDriverWait(browser, WAIT_S).until(EC.presence_of_element_located((By.XPATH, "//input[@aria-label='User name']")))
    browser.save_screenshot(str(artifacts / "1-login.png"))
    name.send_keys("alice")
    browser.find_element(By.XPATH, "//input[@aria-label='Password']").send_keys(PASSWORD)
    click_button(browser, "Log in")
    wait_text(browser, "Logged in as")
    wait_text(browser, "Flagged first")
    time.sleep(1.0)  # let the data grid paint before the screenshot
    browser.save_screenshot(str(artifacts / "2-worklist.png"))

    click_button(browser, "Open the first flagged study")
    WebDriverWait(browser, WAIT_S).until(EC.presence_of_element_located((By.XPATH, "//img[contains(@src, 'media')]")))
    wait_text(browser, "FLAGGED")
    time.sleep(1.0)
    browser.save_screenshot(str(artifacts / "3-study.png"))
    assert beacon[1] == []  # the tags were drawn as text: nothing fetched
    assert not browser.find_elements(By.XPATH, "//a[contains(@href, 'evil')]")
    wait_text(browser, ">0.9999")  # triage.present.format_risk, never 1.0000
    click_button(browser, "Agree")
    wait_text(browser, "recorded: Agree by alice")
    browser.save_screenshot(str(artifacts / "4-study-reviewed.png"))
    ActionChains(browser).send_keys("n").perform()  # keyboard shortcut: next study
    wait_text(browser, "2 of 7")

    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT decision_id, reviewer, verdict FROM reviews").fetchall()
    assert rows == [(7, "alice", "agree")]  # decision 7 has the highest risk among the flagged

    for number, page in ((5, "Audit"), (6, "Active learning")):
        WebDriverWait(browser, WAIT_S).until(EC.element_to_be_clickable(
            (By.XPATH, f"//section[@data-testid='stSidebar']//label[normalize-space()='{page}']"))).click()
        wait_text(browser, "Audit chain" if page == "Audit" else "least sure")
        time.sleep(1.0)
        browser.save_screenshot(str(artifacts / f"{number}-{page.lower().replace(' ', '-')}.png"))
    print(f"screenshots in {artifacts}")
    assert len(list(artifacts.glob("*.png"))) == 6
    assert beacon[1] == []
