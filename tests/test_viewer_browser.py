"""End to end: ``python -m simpool.viewer`` on a free loopback port, driven in a real headless
browser (Debian's ``chromium`` and ``chromium-driver`` through selenium; nothing is downloaded,
and the browser resolves no host name, so the page must load without any network). It uploads
a file that is not an image (one line in the page), then a photo, moves the threshold slider
and checks that the overlay is rendered and changes. Skips in one line where no browser is
installed (``.ci/install_viewer.sh`` installs one).

SIMPOOL_VIEWER_SCREENSHOT=docs/viewer.png also writes a screenshot of the page there.
"""

import importlib.util
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from checkpoint_factory import save_training_checkpoint, tiny_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")


def find_browser():
    """(browser, driver) paths, or a one-line reason why there is none."""
    missing = [m for m in ("selenium", "gradio", "skimage") if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"{', '.join(missing)} not installed (run .ci/install_viewer.sh)"
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = next((shutil.which(d) for d in DRIVERS if shutil.which(d)), None)
    if browser is None or driver is None:
        return None, "no headless browser: chromium and chromium-driver are not installed (run .ci/install_viewer.sh)"
    return (browser, driver), None


@pytest.fixture
def browser():
    found, reason = find_browser()
    if found is None:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = found[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):  # no host name resolves: nothing off this machine loads
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def viewer(tmp_path):
    """(url, process) of a viewer comparing a SimPool and a [CLS] checkpoint."""
    a, b = tmp_path / "simpool.pth", tmp_path / "cls.pth"
    save_training_checkpoint(a, tiny_backbone("simpool", patch_size=7, img_size=28))
    save_training_checkpoint(b, tiny_backbone("official", patch_size=7, img_size=28))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simpool.viewer",
            "--pretrained_weights",
            str(a),
            "--compare",
            str(b),
            "--data_path",
            "fashion-mnist",
            "--subset",
            "3",
            "--port",
            "0",
            "--precision",
            "fp32",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    log, url, deadline = [], None, time.time() + 180
    while url is None and time.time() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        log.append(line)
        m = re.search(r"SimPool viewer at (http://\S+/)", line)
        url = m.group(1) if m else None
    try:
        assert url, "the viewer did not start:\n" + "".join(log)
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_for(driver, condition, what, timeout=90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d), message=what)


def status(driver):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "status").text.strip()


def upload(driver, path):
    """Put ``path`` into the upload box (clearing the file already there)."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(
        By.CSS_SELECTOR, "#upload button[aria-label='Clear'], #upload button[title='Clear']"
    ):
        button.click()
    field = wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "upload field")
    field[0].send_keys(str(path))


def rendered(driver, elem_id):
    """The src of every fully loaded image inside #elem_id."""
    from selenium.webdriver.common.by import By

    return [
        img.get_attribute("src")
        for img in driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
        if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
    ]


def fetch(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return np.asarray(Image.open(r).convert("RGB"))


def test_the_page_in_a_real_browser(browser, viewer, tmp_path):
    import skimage.data
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, proc = viewer
    browser.get(url)
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "the page to load")
    assert browser.title == "SimPool viewer"

    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    upload(browser, bad)
    wait_for(browser, lambda d: status(d).startswith("⚠"), "the bad upload's message")
    assert status(browser).startswith("⚠ notes.png is not a readable image (") and "\n" not in status(browser)

    photo = tmp_path / "chelsea.png"
    Image.fromarray(skimage.data.chelsea()).save(photo)
    upload(browser, photo)  # the server kept serving: the next upload is shown
    wait_for(
        browser,
        lambda d: "views in" in status(d) and rendered(d, "kept-0") and rendered(d, "kept-1"),
        "the photo's views",
    )
    assert status(browser).startswith("chelsea.png: 451x300")
    assert len(rendered(browser, "attention-0")) >= 1 and len(rendered(browser, "attention-1")) >= 4  # mean + 3 heads
    wait_for(
        browser,
        lambda d: len(rendered(d, "masks-0")) == 5 and len(rendered(d, "neighbours-0")) == 8,
        "the masks and the neighbours",
    )
    before = rendered(browser, "kept-0")[0]
    first = fetch(before)
    assert first.shape == (300, 451, 3)  # drawn at the image's own size
    assert "hold 60% of the attention mass" in browser.find_element(By.ID, "kept-text-0").text

    slider = browser.find_element(By.CSS_SELECTOR, "#threshold input[type=range]")
    browser.execute_script("arguments[0].focus()", slider)
    slider.send_keys(*[Keys.ARROW_LEFT] * 6)  # 0.6 -> 0.3
    wait_for(
        browser,
        lambda d: (
            "hold 30% of" in d.find_element(By.ID, "kept-text-0").text
            and rendered(d, "kept-0")
            and rendered(d, "kept-0")[0] != before
        ),
        "the overlay at threshold 0.3",
    )
    after = fetch(rendered(browser, "kept-0")[0])
    assert after.shape == first.shape and not np.array_equal(after, first)  # fewer tokens kept: more dimmed
    assert after.astype(int).sum() < first.astype(int).sum()

    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(r.startswith((url, "data:", "blob:")) for r in resources), resources  # nothing from the network
    assert proc.poll() is None

    screenshot = os.environ.get("SIMPOOL_VIEWER_SCREENSHOT")
    if screenshot:
        for _ in range(3):  # the layout reflows with the window: grow it until the whole page shows
            height = browser.execute_script(
                "return Math.max(document.documentElement.scrollHeight, document.body.scrollHeight)"
            )
            browser.set_window_size(1400, min(height + 120, 4000))
            time.sleep(0.5)
        browser.save_screenshot(os.path.join(ROOT, screenshot) if not os.path.isabs(screenshot) else screenshot)
