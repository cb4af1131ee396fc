"""The page (``GET /``) in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
installed by ``make browser``), driven by Selenium against the real ``deepmetric serve``: enroll
two identities (the page asks for the API key first), look one up and see it first, compare
two images, see a bad file refused in words, remove one. Screenshots go to the test's temp
folder (``page-*.png``), for a person to look at."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_service import KEY, Server, new_gallery, shared_run

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if CHROMIUM is None or not Path(CHROMEDRIVER).is_file():
    pytest.skip(
        "Debian's chromium and chromium-driver are not installed (run `make browser`)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402 - only once the browser is known to be there
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 20


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("page")
    run, files = shared_run(tmp_path_factory)
    server = Server(run, new_gallery(run, root / "page.db"), key=KEY)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,1400"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield {"root": root, "files": files, "server": server, "browser": browser}
    finally:
        browser.quit()
        code, output = server.stop()
        assert code == 0, output


def _wait(browser: WebDriver, condition, what: str):
    return WebDriverWait(browser, WAIT_S, poll_frequency=0.05).until(condition, what)


def _text_in(browser: WebDriver, element_id: str, text: str) -> None:
    _wait(
        browser,
        EC.text_to_be_present_in_element((By.ID, element_id), text),
        f"#{element_id} never showed {text!r}",
    )


def _shot(browser: WebDriver, root: Path, name: str) -> Path:
    path = root / f"page-{name}.png"
    assert browser.save_screenshot(str(path)), path
    return path


def _enroll(browser: WebDriver, name: str, paths: list[Path]) -> None:
    field = browser.find_element(By.ID, "enroll-name")
    field.clear()
    field.send_keys(name)
    chooser = browser.find_element(By.ID, "enroll-files")
    chooser.clear()  # a multiple-file input would add to the files of the last attempt
    chooser.send_keys("\n".join(str(p) for p in paths))
    browser.find_element(By.CSS_SELECTOR, "#enroll-form button").click()


def test_the_page_end_to_end(site: dict) -> None:
    browser, files, root = site["browser"], site["files"], site["root"]
    browser.get(site["server"].url + "/")
    _text_in(browser, "status", "0 identities")
    assert browser.find_element(By.ID, "empty").is_displayed()
    key_form = browser.find_element(By.ID, "key-form")
    assert key_form.is_displayed()  # the server says writes need a key

    # enroll without the key: refused, in words; then with it
    _enroll(browser, "alpha", files[0][:2])
    _text_in(browser, "enroll-error", "API key")
    browser.find_element(By.ID, "api-key").send_keys("wrong key")
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    _enroll(browser, "alpha", files[0][:2])
    _text_in(browser, "enroll-error", "wrong API key")
    browser.find_element(By.ID, "api-key").clear()
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    _enroll(browser, "alpha", files[0][:2])
    _text_in(browser, "enroll-done", "Enrolled alpha (2 images)")
    _enroll(browser, "beta <b>", files[1][:2])
    _text_in(browser, "enroll-done", "Enrolled beta <b> (2 images)")
    _text_in(browser, "status", "2 identities")
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#identities .name")]
    assert names == ["alpha", "beta <b>"]  # a name is text, never markup
    _wait(
        browser,
        lambda b: all(
            b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
            for img in b.find_elements(By.CSS_SELECTOR, "#identities img")
        ),
        "the identity thumbnails never loaded",
    )

    # look up an image of alpha: alpha first, with its thumbnail and distance
    browser.find_element(By.ID, "identify-file").send_keys(str(files[0][5]))
    _wait(
        browser,
        EC.visibility_of_element_located((By.ID, "identify-result")),
        "no identify result",
    )
    first = browser.find_element(By.CSS_SELECTOR, "#candidates li:first-child .name").text
    assert first == "alpha"
    decision = browser.find_element(By.ID, "decision").text
    assert decision.startswith(("alpha (distance", "unknown: nearest alpha")), decision
    rows = browser.find_elements(By.CSS_SELECTOR, "#candidates li")
    assert len(rows) == 2 and all(r.find_element(By.TAG_NAME, "img") for r in rows)
    _shot(browser, root, "1-identified")

    # compare two images
    browser.find_element(By.ID, "verify-a").send_keys(str(files[0][4]))
    browser.find_element(By.ID, "verify-b").send_keys(str(files[1][4]))
    browser.find_element(By.CSS_SELECTOR, "#verify-form button").click()
    _wait(browser, EC.visibility_of_element_located((By.ID, "verify-result")), "no verify")
    verdict = browser.find_element(By.ID, "verify-result").text
    assert verdict.startswith(("same: distance", "different: distance")), verdict

    # a file that is not an image: refused, in words, and the page keeps working
    bad = root / "notes.png"
    bad.write_text("this is not a picture")
    browser.find_element(By.ID, "identify-file").send_keys(str(bad))
    _text_in(browser, "identify-error", "notes.png: not an image file")
    assert not browser.find_element(By.ID, "identify-result").is_displayed()
    _shot(browser, root, "2-bad-file")

    # remove beta (confirming the dialog)
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='remove beta <b>']").click()
    _wait(browser, EC.alert_is_present(), "no confirmation asked").accept()
    _text_in(browser, "status", "1 identity ·")
    names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#identities .name")]
    assert names == ["alpha"]

    # the same page on a phone-sized screen: nothing wider than the screen
    browser.set_window_size(390, 844)
    browser.find_element(By.ID, "identify-file").send_keys(str(files[0][6]))
    _wait(
        browser,
        EC.visibility_of_element_located((By.ID, "identify-result")),
        "no identify result on the phone-sized page",
    )
    width = browser.execute_script("return document.documentElement.scrollWidth")
    inner = browser.execute_script("return window.innerWidth")
    assert width <= inner, (width, inner)
    _shot(browser, root, "3-phone")
    # no script error (the refused requests above are logged as network errors, as they are)
    logs = browser.get_log("browser")
    assert not [e for e in logs if e["level"] == "SEVERE" and e["source"] != "network"], logs
    assert "favicon" not in str(logs)  # the page asks for nothing it does not have
