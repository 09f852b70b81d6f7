"""The web page in a real browser (Debian's headless Chromium): a side-by-side battle with a
vote and the reveal, a streamed chat, and the leaderboard."""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("chromedriver") is None or shutil.which("chromium") is None,
    reason="needs Debian's chromium + chromium-driver (make test installs them as root)",
)

WAIT_S = 60


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def test_battle_vote_reveal_chat_and_leaderboard(browser, gateway, two_policies, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(gateway.url + "/")

    # Arena: both answers stream in, then the vote buttons open; voting reveals the pair.
    browser.find_element(By.ID, "arena-input").send_keys("Tell me a story")
    browser.find_element(By.ID, "arena-send").click()
    vote_a = browser.find_element(By.CSS_SELECTOR, '.votes button[data-winner="a"]')
    wait.until(lambda _: vote_a.is_enabled())
    assert browser.find_element(By.ID, "answer-a").text.strip()
    assert browser.find_element(By.ID, "answer-b").text.strip()
    vote_a.click()
    wait.until(ready.text_to_be_present_in_element((By.ID, "reveal"), "A was"))
    reveal = browser.find_element(By.ID, "reveal").text
    assert sum(v in reveal for v in ("base", *two_policies)) == 2  # two different versions
    assert not browser.find_element(By.ID, "arena-error").text
    browser.save_screenshot(str(tmp_path / "arena.png"))

    # Chat: pick a version, send, the streamed answer appears.
    browser.find_element(By.CSS_SELECTOR, 'nav button[data-panel="chat"]').click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chat-model option")) == 4)
    browser.find_element(By.ID, "chat-input").send_keys("Hello there")
    browser.find_element(By.ID, "chat-send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1
               and d.find_element(By.CSS_SELECTOR, ".msg.assistant").text.strip())
    assert not browser.find_element(By.ID, "chat-error").text

    # Leaderboard: one row per live version (no fit yet: ratings shown as "–").
    browser.find_element(By.CSS_SELECTOR, 'nav button[data-panel="board"]').click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#board-rows tr")) == 3)
    ids = [row.find_elements(By.TAG_NAME, "td")[1].text
           for row in browser.find_elements(By.CSS_SELECTOR, "#board-rows tr")]
    assert sorted(ids) == sorted(["base", *two_policies])
