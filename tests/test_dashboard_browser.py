"""The dashboard in a real browser: `fedge server --dashboard ... --metrics-port ...` and two
`fedge agent --metrics-port ...` processes federate over Mosquitto (signatures on) while headless
Debian chromium, driven through Selenium, watches the page. It must ask for the token, then show
every site, advance with the rounds, draw the AUC curve and show the rejections that a stranger's
garbage update chunk and unsigned status cause. The screenshot is saved in the test's tmp folder
(and copied to docs/dashboard.png when FEDGE_DOCS_SCREENSHOT=1, for the README).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedge.cli.federation import signing_keys
from fedge.protocol import StatusMessage, Topics, sign_record
from fedge.transport import MqttSession

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

FEDGE = [sys.executable, "-m", "fedge.cli.main"]
FED = "watched"
SITES = ("site-1", "site-2")
ROUNDS = 4
TOKEN = "browser-test-token-0123456789"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1400,1150",
)  # fmt: skip

# What the page shows, read in one call.
READ_PAGE = """
const rows = (id) => Array.from(document.querySelectorAll('#' + id + ' tbody tr'));
return {
  round: Number(document.getElementById('round').textContent),
  status: document.getElementById('status').textContent,
  sites: rows('sites').map((tr) => ({site: tr.dataset.site, online: tr.dataset.online,
                                      last_round: tr.querySelector('.last-round').textContent})),
  rejections: Object.fromEntries(rows('rejections').map((tr) => [tr.dataset.reason, Number(tr.querySelector('.count').textContent)])),
  points: document.querySelectorAll('#auc-chart circle').length,
  history: rows('history').length,
  checkpoints: rows('checkpoints').length,
  error: document.getElementById('error').hidden ? '' : document.getElementById('error').textContent,
  token_form: !document.getElementById('token-form').hidden,
  resources: performance.getEntriesByType('resource').map((e) => e.name),
};
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _find(*candidates: str) -> str | None:
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    return None


@pytest.fixture
def browser(tmp_path):
    chromium = _find("chromium", "/usr/bin/chromium", "chromium-browser")
    driver_path = _find("chromedriver", "/usr/bin/chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("chromium and chromedriver are not installed: ./scripts/system-deps.sh (apt-get install -y chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(driver_path, log_output=str(tmp_path / "chromedriver.log")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.name + json.dumps(s.labels, sort_keys=True) * bool(s.labels): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_dashboard_follows_a_federation_on_mosquitto_in_chromium(browser, mosquitto_broker, medmnist_root, tmp_path) -> None:
    # Arrange: server with dashboard and metrics, two agents with metrics, all signed, on Mosquitto.
    host, port = mosquitto_broker
    broker = f"mqtt://{host}:{port}"
    keys = signing_keys(tmp_path / "keys", SITES)
    dashboard_port, metrics_port, agent_metrics_port = _free_port(), _free_port(), _free_port()
    server_log = tmp_path / "server.log"
    procs = [subprocess.Popen(FEDGE + [
        "server", "--broker", broker, "--federation", FED, "--dataset", "breastmnist", "--data-dir", str(medmnist_root),
        "--rounds", str(ROUNDS), "--min-clients", "2", "--clients", ",".join(SITES), "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--evaluate", "--epochs", "4", "--trusted-keys", str(keys["trusted"]), "--signing-key", str(keys["server"]),
        "--dashboard", f"127.0.0.1:{dashboard_port}", "--dashboard-token", TOKEN, "--metrics-port", str(metrics_port),
        "--linger", "5",  # the page sees the last round before the server exits (4 epochs: rounds of about a second, seen one by one)
    ], stdout=server_log.open("wb"), stderr=subprocess.STDOUT)]  # fmt: skip
    url = f"http://127.0.0.1:{dashboard_port}/"
    mallory = None
    try:
        deadline = time.monotonic() + 120
        while True:  # the server loads the data set before it serves
            assert procs[0].poll() is None, server_log.read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard never listened"
                time.sleep(0.3)

        # Without the token the page holds nothing and asks for it.
        browser.get(url)
        time.sleep(1.5)
        page = browser.execute_script(READ_PAGE)
        assert page["token_form"] and "bearer token" in page["error"] and page["sites"] == []

        browser.get(url + "?poll_ms=300#token=" + TOKEN)
        for i, site in enumerate(SITES):
            procs.append(subprocess.Popen(FEDGE + [
                "agent", "--broker", broker, "--site", site, "--federation", FED, "--dataset", "breastmnist",
                "--data-dir", str(medmnist_root), "--shard", str(i), "--num-shards", "2", "--alpha", "1.0",
                "--state-dir", str(tmp_path / site), "--signing-key", str(keys[site]), "--server-key", str(keys["server.pub"]),
                *(["--metrics-port", str(agent_metrics_port)] if i == 0 else []),
            ], stdout=subprocess.DEVNULL, stderr=(tmp_path / f"{site}.log").open("wb")))  # fmt: skip

        # Act: watch the page; once round 1 is done, a stranger publishes garbage into the open round
        # under site-1's name and an unsigned status, and the running processes' metrics are scraped.
        seen, live, agent_live = set(), None, None
        deadline = time.monotonic() + 300
        while True:
            page = browser.execute_script(READ_PAGE)
            seen.add(page["round"])
            if page["round"] >= 1 and mallory is None:
                mallory = MqttSession(broker, "mallory", clean_session=True).connect()
                mallory.publish(Topics(FED).update_chunk(page["round"] + 1, "site-1", 0), b"\x00garbage\xff" * 10)
                mallory.publish(Topics(FED).status("site-1"), sign_record(StatusMessage(federation=FED, sender="site-1", state="offline"), None))
                live, agent_live = scrape(metrics_port), scrape(agent_metrics_port)
            if page["round"] == ROUNDS and page["status"] == "finished" and len(page["rejections"]) >= 2:
                break
            assert time.monotonic() < deadline and procs[0].poll() is None, (page, server_log.read_text()[-3000:])
            time.sleep(0.2)
        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        if os.environ.get("FEDGE_DOCS_SCREENSHOT") == "1":
            shutil.copyfile(shot, DOCS_SCREENSHOT)
        assert procs[0].wait(timeout=60) == 0, server_log.read_text()[-3000:]
        for proc, site in zip(procs[1:], SITES):
            assert proc.wait(timeout=60) == 0, (tmp_path / f"{site}.log").read_text()[-3000:]
    finally:
        if mallory is not None:
            mallory.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    # Assert: every site, every round, the curve, the rejections the server logged, nothing from outside.
    assert {s["site"]: s["last_round"] for s in page["sites"]} == {site: str(ROUNDS) for site in SITES}
    assert len(seen & set(range(1, ROUNDS + 1))) >= 2 and ROUNDS in seen, f"the page never advanced: {sorted(seen)}"
    assert page["points"] == ROUNDS and page["history"] == ROUNDS and page["checkpoints"] >= ROUNDS
    log = server_log.read_text()
    logged = json.loads(log.split("refused inputs this run, by kind: ")[1].splitlines()[0])
    assert page["rejections"] == logged, (page["rejections"], logged)
    assert logged.get("bad-signature", 0) >= 1  # the unsigned status
    assert logged.get("bad-chunk", 0) + logged.get("unexpected-topic", 0) >= 1  # the garbage chunk
    assert all(name.startswith(url) for name in page["resources"]), page["resources"]
    # The processes' metrics, scraped while they ran.
    assert live["fedge_rounds_completed_total"] >= 1 and live["fedge_sites_online"] == 2, live
    assert agent_live["fedge_agent_rounds_completed_total"] >= 1 and agent_live["fedge_agent_train_seconds_count"] >= 1, agent_live
