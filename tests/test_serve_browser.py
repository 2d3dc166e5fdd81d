"""The page end to end in headless Chromium: pick a user, steer the ranking, no HTML injection."""

import os
import shutil

import pytest
from serve_fixtures import genres_of, live_server

pytestmark = pytest.mark.slow  # the ranking model is the real MiniLM

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
HORROR = "I love horror films: scary horror movies full of ghosts, monsters and screams."
INJECTION = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> horror'


@pytest.fixture(scope="module")
def browser():
  from selenium import webdriver
  for binary in (CHROMIUM, CHROMEDRIVER):
    if not shutil.which(binary):
      pytest.fail(f"{binary} not found: `make test` installs chromium and chromium-driver",
                  pytrace=False)
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1280,900"):
    options.add_argument(arg)
  driver = webdriver.Chrome(options=options,
                            service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
  yield driver
  driver.quit()


def _wait(driver, condition, timeout=300):
  from selenium.webdriver.support.ui import WebDriverWait
  return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))


def _ranking(driver):
  from selenium.webdriver.common.by import By
  return [int(li.get_attribute("data-item"))
          for li in driver.find_elements(By.CSS_SELECTOR, "#ranking li")]


def _version(driver) -> int:
  return int(driver.find_element("id", "ranking").get_attribute("data-version"))


def _type_profile(driver, text):
  before = _version(driver)
  # One edit of the whole text, as a paste does (typing key by key re-ranks on the way).
  driver.execute_script("const box = document.getElementById('profile'); box.value = arguments[0];"
                        " box.dispatchEvent(new Event('input', {bubbles: true}));", text)
  _wait(driver, lambda d: _version(d) > before and
        d.find_element("id", "ranked-profile").text.strip() == text.strip())


def test_pick_a_user_then_steer_the_list_by_editing_the_profile(browser, served_session):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select
  horror = lambda items: sum("Horror" in genres_of(served_session, i) for i in items)
  with live_server(served_session) as url:
    browser.get(url)
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
    user = served_session.user_ids()[3]
    Select(browser.find_element("id", "user")).select_by_value(str(user))
    temperature = browser.find_element("id", "temperature")
    temperature.clear()
    temperature.send_keys("1")  # the tiny writer's greedy profile can be empty
    browser.find_element("id", "generate").click()
    # The profile streams in (two pieces of 4 tokens), then the lists come.
    _wait(browser, lambda d: int(d.find_element("id", "profile").get_attribute("data-pieces")
                                 or 0) >= 2)
    _wait(browser, lambda d: _version(d) >= 1)
    profile = browser.find_element("id", "profile").get_attribute("value")
    written = served_session.write_profile(served_session.dataset_prompt(user), seed=0,
                                           temperature=1.0)
    assert profile == written and profile
    assert "held-out target" in browser.find_element("id", "user-info").text
    before = _ranking(browser)
    assert len(before) == served_session.top_k, browser.find_element("id", "error").text
    assert browser.find_elements(By.CSS_SELECTOR, "#zero-ranking li")

    _type_profile(browser, HORROR)
    after = _ranking(browser)
    assert horror(after) > horror(before) and horror(after) >= served_session.top_k // 2
    moves = browser.find_elements(By.CSS_SELECTOR, "#ranking li .up, #ranking li .new")
    assert moves  # the items that rose or came in are marked
    if os.environ.get("SERVE_SCREENSHOT"):
      browser.save_screenshot(os.environ["SERVE_SCREENSHOT"])

    # Typed text is shown as text: no element is created, no script runs.
    _type_profile(browser, INJECTION)
    shown = browser.find_element("id", "ranked-profile")
    assert shown.text == INJECTION
    assert shown.find_elements(By.TAG_NAME, "img") == []
    history = browser.find_element("id", "history-input")
    history.send_keys(INJECTION)
    browser.find_element("id", "generate").click()
    _wait(browser, lambda d: "unknown item" in d.find_element("id", "error").text)
    assert INJECTION in browser.find_element("id", "error").text
    assert browser.find_elements(By.CSS_SELECTOR, "img") == []
    assert browser.execute_script("return window.pwned === undefined")
