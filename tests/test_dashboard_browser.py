"""The dashboard in a real headless Chromium, against a live server that is itself a mesh node
with two peer processes: log in, see the peers and the counters, watch them change.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/test`` installs them when it
can) and Selenium (the ``test`` extra). Without them the test is skipped, except in CI
(``CI=true``), where it must run. The screenshots are kept in ``test-artifacts/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User

import django_warpmesh
from harness import ROOT, free_ports, wait_for
from tests.cluster import Cluster, cluster, node_in_this_process

pytestmark = [pytest.mark.mesh, pytest.mark.django_db(transaction=True)]

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = ("chromium", "chromium-browser")
CHROMEDRIVER = "chromedriver"


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not any(shutil.which(name) for name in CHROMIUM):
        return "no chromium binary (apt-get install chromium chromium-driver)"
    if not shutil.which(CHROMEDRIVER):
        return "no chromedriver binary (apt-get install chromium-driver)"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = _missing()
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test, but {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(
        str(shutil.which(name)) for name in CHROMIUM if shutil.which(name)
    )
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
    ):
        options.add_argument(argument)
    # The driver from the same Debian build: Selenium downloads nothing.
    driver = webdriver.Chrome(options=options, service=Service(str(shutil.which(CHROMEDRIVER))))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def mesh() -> Iterator[tuple[str, Cluster]]:
    (port,) = free_ports(1)
    own = f"127.0.0.1:{port}"
    with cluster(2, extra_peers=[own]) as peers, node_in_this_process(port, peers.addresses):
        wait_for(
            lambda: sum(peer["connected"] for peer in django_warpmesh.mesh_stats()["peers"]) == 2,
            10,
            message="the live server's node to connect to both peers",
        )
        peers.wait_connected()
        yield own, peers


def text(driver: Any, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, selector).text)


def wait_until(driver: Any, condition: Any, message: str, timeout: float = 10) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page redraws its rows at every refresh: an element may go stale under our feet.
    ignored = (StaleElementReferenceException,)
    return WebDriverWait(driver, timeout, 0.05, ignored).until(condition, message)


def peer_rows(driver: Any) -> dict[str, dict[str, Any]]:
    """The peer table as drawn right now, read in one go (the rows are redrawn every second)."""
    rows: dict[str, dict[str, Any]] = driver.execute_script(
        """
        const rows = {};
        for (const tr of document.querySelectorAll("#wm-peers tbody tr[data-address]")) {
          rows[tr.dataset.address] = {
            class: tr.className,
            text: tr.innerText,
            cells: Array.from(tr.cells, (td) => td.innerText.trim()),
          };
        }
        return rows;
        """
    )
    return rows


def test_dashboard_in_chromium(
    browser: Any, live_server: Any, mesh: tuple[str, Cluster], django_user_model: type[User]
) -> None:
    from selenium.webdriver.common.by import By

    own, peers = mesh
    django_user_model.objects.create_user("operator", password="mesh-pw", is_staff=True)

    # Staff only: the dashboard sends the browser to the admin login, and back.
    browser.get(f"{live_server.url}/warpmesh/?refresh=1")
    wait_until(browser, lambda d: "/admin/login/" in d.current_url, "the login page")
    browser.find_element(By.ID, "id_username").send_keys("operator")
    browser.find_element(By.ID, "id_password").send_keys("mesh-pw")
    browser.find_element(By.CSS_SELECTOR, "[type=submit]").click()
    wait_until(browser, lambda d: d.current_url.endswith("/warpmesh/?refresh=1"), "the dashboard")
    browser.get_log("browser")  # drop the login page's (its admin CSS is not served here)

    # The script has replaced the server's rendering with a fetched one.
    wait_until(browser, lambda d: text(d, "#wm-updated").startswith("updated "), "a refresh")
    assert text(browser, "h1") == "Warp Mesh"
    assert text(browser, "#wm-health") == "healthy"
    assert text(browser, "#wm-address") == own
    assert text(browser, "#wm-peer-id") == django_warpmesh.mesh_stats()["peer_id"]
    assert text(browser, "#wm-transport-name") == "nng"
    assert text(browser, "#wm-transport-url") == own
    assert text(browser, "#wm-transport-state") == "connected"
    assert text(browser, "#wm-heartbeat") == "0.20 s"
    assert not browser.find_element(By.ID, "wm-transport-error").is_displayed()

    wait_until(browser, lambda d: set(peer_rows(d)) == set(peers.addresses), "both peers")
    wait_until(
        browser,
        lambda d: all(" ms" in row["text"] for row in peer_rows(d).values()),
        "a latency for each peer",
    )
    for address, row in peer_rows(browser).items():
        assert row["class"] == "ok"
        assert row["cells"][0] == "connected"
        assert row["cells"][2] == address
        assert row["cells"][3] == "PEERS"  # how this process found it
    assert text(browser, "[data-counter=peers_connected]") == "2"
    assert text(browser, "[data-counter=peers_known]") == "2"

    # Counters move without a reload: a peer writes, this process counts it.
    received = int(text(browser, "[data-counter=invalidations_received]"))
    peers.procs[0].cache("delete", "seen-from-the-browser")
    peers.procs[1].cache("delete", "seen-from-the-browser-too")
    wait_until(
        browser,
        lambda d: int(text(d, "[data-counter=invalidations_received]")) >= received + 2,
        "the peers' invalidations to be counted on the page",
    )
    wait_until(
        browser,  # the "Invalidations received" column: one from each peer
        lambda d: all(int(row["cells"][5]) >= 1 for row in peer_rows(d).values()),
        "the per-peer counts",
    )
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000

    # A peer dies: its row turns red and the badge says degraded, still without a reload.
    gone = peers.procs[1]
    gone.kill()
    wait_until(
        browser,
        lambda d: peer_rows(d)[gone.address]["class"] == "down",
        "the dead peer to be shown unreachable",
    )
    wait_until(browser, lambda d: text(d, "#wm-health") == "degraded", "the degraded badge")
    assert peer_rows(browser)[gone.address]["cells"][0] == "unreachable"
    assert text(browser, "[data-counter=peers_connected]") == "1"
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard-degraded.png"))
    # The page never failed a refresh.
    assert not browser.find_element(By.ID, "wm-error").is_displayed()
    logs: list[dict[str, Any]] = browser.get_log("browser")
    assert not [entry for entry in logs if entry.get("level") == "SEVERE"], logs


def test_artifacts_directory_is_ignored_by_git() -> None:
    assert "test-artifacts/" in Path(ROOT / ".gitignore").read_text().splitlines()
