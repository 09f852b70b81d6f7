"""The gateway's pages in a real browser (Debian's headless Chromium) against the real stack
with the tiny model: a battle voted by keyboard and revealed, a streamed chat with stop and
regenerate, the leaderboard with intervals and the heat map, the operator console (wrong token
refused, promote and roll back with the right one), and every page at a 375 px phone width.

Set ARENA_SCREENSHOT_DIR to keep the pages' screenshots (desktop and phone) there: that is how
docs/pages/*.png are made."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

pytestmark = pytest.mark.skipif(
    shutil.which("chromedriver") is None or shutil.which("chromium") is None,
    reason="needs Debian's chromium + chromium-driver (make test installs them as root)",
)

WAIT_S = 60
DESKTOP = (1200, 900)
PHONE_WIDTH = 375
PAGES = ("/", "/chat", "/leaderboard", "/ops")
ADMIN_TOKEN = "test-admin-token"  # tests/conftest.py's settings


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={DESKTOP[0]},{DESKTOP[1]}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def screenshot(browser: Any, tmp_path: Path, name: str) -> None:
    """Keep a screenshot (always in the test's folder; also in ARENA_SCREENSHOT_DIR if set)
    and check it is a real image."""
    path = tmp_path / f"{name}.png"
    browser.save_screenshot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    if target := os.environ.get("ARENA_SCREENSHOT_DIR"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def csp_violations(browser: Any) -> list[str]:
    """Console errors that report a blocked script, style or connection."""
    return [entry["message"] for entry in browser.get_log("browser")
            if "Content Security Policy" in entry["message"]]


def fit_ratings(settings: Any, versions: list[str], tmp_path: Path) -> None:
    """Votes among `versions` archived and refitted by the ranker's own code (no ranker
    process runs in this test)."""
    from feedback.archive import Archive
    from feedback.refit import refit_ratings
    from testkit.synthetic_votes import synthetic_votes

    strengths = {version: 150.0 * i for i, version in enumerate(versions)}  # Elo points
    archive = Archive(f"sqlite:///{tmp_path / 'archive.db'}")
    archive.insert_votes(synthetic_votes(300, strengths=strengths, seed=3))
    assert refit_ratings(redis.Redis.from_url(settings.effective_redis_url), archive,
                         rounds=50) is not None
    archive.close()


def test_battle_by_keyboard_chat_with_stop_and_leaderboard(browser, gateway, gateway_settings,
                                                           two_policies, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.set_window_size(*DESKTOP)

    # Side by side: both answers stream in; "1" votes A once the turn is done; the reveal
    # names two different versions; "n" starts the next battle.
    browser.get(gateway.url + "/")
    vote_a = browser.find_element(By.CSS_SELECTOR, '#votes button[data-winner="a"]')
    assert not vote_a.is_enabled()  # nothing to vote on yet
    prompt = browser.find_element(By.ID, "arena-input")
    prompt.send_keys("Tell me a story")
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)
    wait.until(lambda _: vote_a.is_enabled())
    answers = [browser.find_element(By.CSS_SELECTOR, f"#log-{side} .msg.assistant").text
               for side in "ab"]
    assert all(a.strip() for a in answers), answers
    browser.find_element(By.TAG_NAME, "body").send_keys("1")
    wait.until(ready.text_to_be_present_in_element((By.ID, "reveal"), "A was"))
    reveal = browser.find_element(By.ID, "reveal").text
    assert sum(v in reveal for v in ("base", *two_policies)) == 2, reveal
    assert not vote_a.is_enabled()  # voted: no second vote offered
    assert not browser.find_element(By.ID, "arena-error").text
    screenshot(browser, tmp_path, "arena-desktop")
    browser.find_element(By.TAG_NAME, "body").send_keys("n")
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#log-a .msg"))
    assert not browser.find_element(By.ID, "reveal").text

    # Chat: pick a version, the answer streams in; Stop aborts a turn; Regenerate answers it;
    # the conversation survives a reload of the tab. (The tiny random model may answer with
    # nothing at all: the page keeps such an answer, marked "(empty answer)".)
    def answered(count: int) -> None:
        wait.until(lambda d: not d.find_element(By.ID, "chat-stop").is_enabled())
        assistant = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        assert len(assistant) == count, browser.find_element(By.TAG_NAME, "main").text
        assert not browser.find_element(By.ID, "chat-error").text

    browser.get(gateway.url + "/chat")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-model option")) == 4)
    Select(browser.find_element(By.ID, "chat-model")).select_by_value(two_policies[0])
    browser.find_element(By.ID, "chat-input").send_keys("Hello there")
    browser.find_element(By.ID, "chat-send").click()
    answered(1)
    # New chat (the tiny model's 512-token context is full after one long answer), then a
    # turn stopped before its answer came, and Regenerate answering it.
    browser.find_element(By.ID, "new-chat").click()
    assert not browser.find_elements(By.CSS_SELECTOR, "#chat-log .msg")
    browser.find_element(By.ID, "chat-input").send_keys("And then?")
    browser.execute_script("document.getElementById('chat-send').click();"
                           "document.getElementById('chat-stop').click();")
    wait.until(ready.text_to_be_present_in_element((By.ID, "chat-error"), "Stopped."))
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    regenerate = browser.find_element(By.ID, "chat-regenerate")
    wait.until(lambda _: regenerate.is_enabled())
    regenerate.click()
    answered(1)
    roles = [m.get_attribute("class") for m in browser.find_elements(By.CSS_SELECTOR, ".msg")]
    assert roles == ["msg user", "msg assistant"], roles
    screenshot(browser, tmp_path, "chat-desktop")
    browser.refresh()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-log .msg")) == 2)
    # the model list arrives by its own request, after the restored conversation
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-model option")) == 4)
    assert Select(browser.find_element(By.ID, "chat-model")).first_selected_option \
        .get_attribute("value") == two_policies[0]

    # Leaderboard: every voted version with its interval (text and bar), the heat map.
    fit_ratings(gateway_settings, ["base", *two_policies], tmp_path)
    browser.get(gateway.url + "/leaderboard")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#board-rows tr")) == 3
               and d.find_element(By.CSS_SELECTOR, "#board-rows tr td:nth-child(4)").text != "–")
    rows = browser.find_elements(By.CSS_SELECTOR, "#board-rows tr")
    assert sorted(r.get_attribute("data-version") for r in rows) == ["base", *two_policies]
    shown = [float(r.find_elements(By.TAG_NAME, "td")[2].text) for r in rows]
    assert shown == sorted(shown, reverse=True) and shown[0] - shown[-1] > 50  # best first
    for row in rows:
        low, high = (float(x) for x in row.find_elements(By.TAG_NAME, "td")[3].text.split(" – "))
        rating = float(row.find_elements(By.TAG_NAME, "td")[2].text)
        assert low <= rating <= high
        assert len(row.find_elements(By.CSS_SELECTOR, "svg.ci-bar line")) == 4  # axis + bar
    heat = browser.find_elements(By.CSS_SELECTOR, "#heat td.cell")
    assert len(heat) == 9 and sum(c.text.endswith("%") for c in heat) == 6  # diagonal: "–"
    wait.until(lambda d: d.execute_script(
        "const i = document.getElementById('history-chart'); return i.complete && i.naturalWidth"))
    screenshot(browser, tmp_path, "leaderboard-desktop")
    assert not csp_violations(browser)


def test_ops_console_refuses_a_wrong_token_then_promotes_and_rolls_back(
        browser, gateway, two_policies, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.set_window_size(*DESKTOP)

    def current() -> str:
        models = httpx.get(gateway.url + "/v1/models").json()["data"]
        return next(m["alias_of"] for m in models if m["id"] == "current")

    def confirm_and_wait_for(text: str) -> None:
        wait.until(ready.alert_is_present())
        browser.switch_to.alert.accept()
        wait.until(ready.text_to_be_present_in_element((By.ID, "action-result"), text))

    browser.get(gateway.url + "/ops")
    response = httpx.get(gateway.url + "/ops")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "ops-error"), "Wrong or missing"))
    assert not browser.find_element(By.ID, "console").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('arena.adminToken')") is None

    browser.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#versions tr")) == 3)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#learner-cards .card"))
    assert browser.find_element(By.ID, "login").is_displayed() is False
    # The 401 the wrong token got is listed among the recent errors.
    wait.until(lambda d: "invalid_admin_token" in d.find_element(By.ID, "errors").text)
    screenshot(browser, tmp_path, "ops-desktop")

    target = two_policies[0]
    browser.find_element(
        By.CSS_SELECTOR, f'#versions tr[data-version="{target}"] button').click()  # Promote
    confirm_and_wait_for(f"promote {target}")
    assert current() == target
    wait.until(lambda d: "current" in d.find_element(
        By.CSS_SELECTOR, f'#versions tr[data-version="{target}"] td:nth-child(2)').text)

    browser.find_element(By.ID, "rollback").click()
    confirm_and_wait_for("rollback base")
    assert current() == "base"
    assert not browser.find_element(By.ID, "ops-error").text
    assert not csp_violations(browser)


@pytest.mark.parametrize("path", PAGES)
def test_pages_fit_a_phone(browser, gateway, two_policies, tmp_path, path):
    """At 375 px no page scrolls sideways and every control is on screen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": PHONE_WIDTH, "height": 800, "deviceScaleFactor": 2, "mobile": True})
    try:
        browser.get(gateway.url + path)
        if path == "/ops":  # the console's controls, not only the sign-in form
            browser.execute_script(f"sessionStorage.setItem('arena.adminToken', '{ADMIN_TOKEN}')")
            browser.get(gateway.url + path)
            WebDriverWait(browser, WAIT_S).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#versions tr"))
        WebDriverWait(browser, WAIT_S).until(
            lambda d: d.execute_script("return document.readyState") == "complete")
        width = browser.execute_script("return window.innerWidth")
        assert width == PHONE_WIDTH
        scroll = browser.execute_script("return document.documentElement.scrollWidth")
        assert scroll <= width, f"{path} scrolls sideways: {scroll} px wide"
        outside = browser.execute_script("""
            const w = window.innerWidth;
            return [...document.querySelectorAll('button, input, textarea, select, a')]
              .filter((e) => e.offsetParent !== null && !e.closest('.table-wrap'))
              .map((e) => [e.id || e.textContent.trim(), e.getBoundingClientRect()])
              .filter(([, r]) => r.left < 0 || r.right > w)
              .map(([name, r]) => `${name}: ${r.left}..${r.right}`);""")
        assert outside == [], outside
        name = "arena" if path == "/" else path.strip("/")
        screenshot(browser, tmp_path, f"{name}-phone")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        browser.execute_script("sessionStorage.clear()")
