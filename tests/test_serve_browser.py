"""`ditkit serve` in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by Selenium.

One server process on 127.0.0.1 serves a tiny checkpoint made here. The browser picks classes, a sampler, steps
and a seed, presses Generate, and the gallery's images must equal, pixel for pixel, what `ditkit sample` writes
when run with the command line the page shows. A seed out of range must show a message; a client that closes
mid-sample must leave the server able to serve the next one. No request may leave 127.0.0.1: the browser's
network log (DevTools performance log) and the server's own socket connections (a Python audit hook) are checked.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ditkit
from ditkit.cli import main

webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium: pip install -e .[test]")
if importlib.util.find_spec("gradio") is None:  # found, not imported: the server process imports it
    pytest.skip("ditkit serve needs gradio: pip install -e .[test]", allow_module_level=True)
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Runs the server with an audit hook that records every socket connection and name lookup it makes.
SERVER = """
import sys
log = open(sys.argv[1], "a", buffering=1)
def hook(event, args):
    if event == "socket.connect":
        log.write("connect %r\\n" % (args[1],))
    elif event == "socket.getaddrinfo":
        log.write("lookup %r\\n" % (args[0],))
sys.addaudithook(hook)
from ditkit.cli import main
raise SystemExit(main(sys.argv[2:]))
"""
LONG_STEPS = 300  # the request a client leaves: about 2 s on one thread, longer than it takes to see it start
LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def _binary(*names: str) -> str | None:
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


def _browser() -> tuple[str, str]:
    """Chromium and its driver; skipped (with the reason) only where .ci/run could not install them."""
    chromium, driver = _binary("chromium", "chromium-browser"), _binary("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = os.environ.get("DITKIT_BROWSER_SKIP")
    if reason:
        pytest.skip(f"no chromium/chromedriver: {reason}")
    if os.environ.get("DITKIT_CI"):
        pytest.fail("chromium and chromium-driver are missing although .ci/run should have installed them")
    pytest.skip("no chromium/chromedriver here: apt-get install chromium chromium-driver (.ci/run does)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    model = ditkit.create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=32,
                                num_heads=2, class_dropout_prob=0.1)
    for p in model.parameters():  # random output layers (the official init zeroes them): labels matter
        if p.requires_grad and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    ditkit.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, process, folder): `ditkit serve` on a free port of 127.0.0.1, one thread, its connections logged."""
    _browser()
    folder = tmp_path_factory.mktemp("serve")
    ckpt = _tiny_checkpoint(folder / "tiny.safetensors")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(folder / "gradio")}
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(folder / "sockets.log"), "serve", "--ckpt", str(ckpt),
                             "--port", str(port), "--max-images", "24"], env=env, stdout=log, stderr=log,
                            cwd=folder)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2):
                break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"ditkit serve did not start: {(folder / 'server.log').read_text()[-2000:]}")
    yield url, proc, folder
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _driver(requests: list[str]):
    """Headless Chromium; `requests` collects every URL the page asks for (DevTools' network events)."""
    chromium, driver = _browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--window-size=1400,1100", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--disable-extensions", "--metrics-recording-only"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)
    browser.collected = requests
    return browser


def _collect(browser) -> None:
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            browser.collected.append(message["params"]["request"]["url"])


def _set(browser, elem_id: str, value: str) -> None:
    field = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(value, Keys.TAB)


def _pick(browser, elem_id: str, choices: list[str]) -> None:
    """A Gradio dropdown: remove its tokens (multiselect) and choose `choices` by typing them."""
    while tokens := browser.find_elements(By.CSS_SELECTOR, f"#{elem_id} .token-remove"):
        tokens[0].click()  # the list re-renders: find the next one again
    for choice in choices:
        field = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
        field.click()
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(choice)
        shown = f'#{elem_id} [role=option][aria-label="{choice}"]'  # the list filtered to the typed text
        option = WebDriverWait(browser, 10, poll_frequency=0.1).until(
            lambda b, css=shown: (b.find_elements(By.CSS_SELECTOR, css) or [False])[0])
        option.click()
    browser.find_element(By.TAG_NAME, "h2").click()  # close the list


def _command(browser) -> str:
    return browser.find_element(By.CSS_SELECTOR, "#command textarea").get_attribute("value")


def _wait_images(browser, count: int, seed: int, timeout: float = 40) -> list[str]:
    """The gallery's image URLs once the page shows `count` of them for `seed`."""
    def ready(b):
        srcs = [i.get_attribute("src") for i in b.find_elements(By.CSS_SELECTOR, "#gallery img")]
        return srcs if len(srcs) >= count and f"--seed {seed} " in _command(b) else False

    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(ready)


def _progress(browser) -> str | None:
    """The gallery's progress text while the request runs (None before it shows)."""
    text = browser.find_element(By.ID, "gallery").text
    return text if "sampling" in text or f"/{LONG_STEPS}" in text else None


def _image(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=10) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())))


def _generate(browser, classes: list[str], sampler: str, steps: int, seed: int, per_label: int) -> None:
    _pick(browser, "classes", classes)
    _pick(browser, "sampler", [sampler])
    _set(browser, "steps", str(steps))
    _set(browser, "per_label", str(per_label))
    _set(browser, "seed", str(seed))
    browser.find_element(By.ID, "generate").click()


def _opened(url: str, requests: list[str]):
    """A headless Chromium on the page, its Generate button loaded (the browser is closed if that fails)."""
    browser = _driver(requests)
    try:
        browser.get(url)
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.ID, "generate"))
    except BaseException:
        browser.quit()
        raise
    return browser


@pytest.mark.usefixtures("one_thread")
def test_page_equals_ditkit_sample(server, tmp_path):
    url, proc, folder = server
    requests: list[str] = []
    browser = _opened(url, requests)
    try:
        # An out-of-range seed: a message in the page, nothing sampled.
        _set(browser, "seed", "-3")
        browser.find_element(By.ID, "generate").click()
        message = "seed must be in 0..4294967295, got -3"
        WebDriverWait(browser, 20).until(lambda b: message in b.find_element(By.TAG_NAME, "body").text)
        assert not browser.find_elements(By.CSS_SELECTOR, "#gallery img")
        # Two classes, DDIM 6 steps, seed 5, three images each.
        _generate(browser, ["class 3", "class 7"], "ddim", 6, 5, 3)
        srcs = _wait_images(browser, 6, 5)
        browser.save_screenshot(str(tmp_path / "serve.png"))
        command = _command(browser)
        pages = [_image(s) for s in srcs]
        grid_url = browser.find_element(By.CSS_SELECTOR, "#grid img").get_attribute("src")
        page_grid = _image(grid_url)
        _collect(browser)
    finally:
        browser.quit()
    argv = shlex.split(command)
    assert argv[:2] == ["ditkit", "sample"]
    for flag in ("--class-labels 3 7", "--sampler ddim", "--num-steps 6", "--seed 5", "--per-label 3"):
        assert flag in command, command
    out = tmp_path / "cli"
    argv[argv.index("--out") + 1] = str(out)
    assert main(argv[1:] + ["--no-progress"]) == 0
    written = sorted((out / "images").glob("*.png"))
    assert [p.name for p in written] == [f"{i:04d}_class{y}.png" for i, y in enumerate([3, 3, 3, 7, 7, 7])]
    for page_image, path in zip(pages, written):
        np.testing.assert_array_equal(page_image, np.asarray(Image.open(path)))
    np.testing.assert_array_equal(page_grid, np.asarray(Image.open(out / "grid.png")))
    assert len({p.tobytes() for p in pages}) == 6  # not one image repeated
    _check_local(requests, folder, url)
    assert proc.poll() is None


@pytest.mark.usefixtures("one_thread")
def test_server_survives_a_client_that_leaves(server):
    url, proc, folder = server
    requests: list[str] = []
    browser = _opened(url, requests)
    try:
        _generate(browser, ["class 1", "class 2"], "ddpm", LONG_STEPS, 11, 12)  # a few seconds of sampling
        # Leave once the page shows the request running (its progress), before any image arrives.
        WebDriverWait(browser, 20, poll_frequency=0.1).until(lambda b: _progress(b) is not None)
        assert not browser.find_elements(By.CSS_SELECTOR, "#gallery img")
        _collect(browser)
    finally:
        browser.quit()
    browser = _driver(requests)
    try:
        browser.get(url)
        WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.ID, "generate"))
        _generate(browser, ["class 4"], "dpm-solver", 4, 2, 2)
        try:
            srcs = _wait_images(browser, 2, 2, timeout=60)
        except TimeoutException:
            pytest.fail(f"no images after the first client left: {(folder / 'server.log').read_text()[-2000:]}")
        assert len(srcs) == 2
        _collect(browser)
    finally:
        browser.quit()
    assert proc.poll() is None
    assert "Traceback" not in (folder / "server.log").read_text()
    _check_local(requests, folder, url)


def _check_local(requests: list[str], folder: Path, url: str) -> None:
    """Every browser request went to the server (or was inline data); the server connected to nothing else."""
    assert requests
    outside = [u for u in requests if not (u.startswith(url) or u.startswith(("data:", "blob:")))]
    assert not outside, outside[:5]
    for line in (folder / "sockets.log").read_text().splitlines():
        assert any(host in line for host in LOOPBACK) or "'/" in line, line  # loopback or a Unix socket
