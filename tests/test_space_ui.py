"""The Space as a person uses it, in a real browser (Debian's Chromium driven by Playwright), and through
`gradio_client`. The app serves the digits model shipped in the package on 127.0.0.1.

These tests fail, not skip, when Chromium or Playwright is missing (CI installs both, see .ci/run); set
DIFFIT_SKIP_UI=1 to skip the browser part explicitly. DIFFIT_SCREENSHOT=path saves the README's screenshot.
"""

import os
import shutil
import socket
import types
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from .test_space_app import load_app


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT_MS = 120_000  # generous: the CI machine's two cores may be shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def server(app):
    pipe, info = app.load_pipeline()
    demo = app.build_demo(pipe, info)
    port = free_port()
    app.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False)
    yield types.SimpleNamespace(url=f"http://127.0.0.1:{port}/", pipe=pipe)
    demo.close()


def chromium_path() -> str:
    path = os.environ.get("DIFFIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed (apt-get install chromium); DIFFIT_SKIP_UI=1 skips browser tests.")
    return path


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("DIFFIT_SKIP_UI") == "1":
        pytest.skip("DIFFIT_SKIP_UI=1")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url)
    expect(page.locator("#generate")).to_be_visible()
    yield page
    page.close()


# ---------------------------------------------------------------------------------------------------------------------
# What a person does


def pick_classes(page, *names):
    """Clear the picker, then for each name: type it into the search box and click the matching option."""
    page.locator("#classes .remove-all").click()
    search = page.locator("#classes input[role=combobox]")
    for name in names:
        search.click()
        search.fill(name)
        page.locator("ul[role=listbox] li[role=option]", has_text=name).first.click()
    for name in names:
        expect(page.locator("#classes .token", has_text=name)).to_be_visible()


def type_custom_class(page, text):
    search = page.locator("#classes input[role=combobox]")
    search.click()
    search.fill(text)
    search.press("Enter")
    expect(page.locator("#classes .token", has_text=text)).to_be_visible()


def set_seed(page, seed: str):
    page.locator("#seed input").fill(seed)


def watch_progress(page):
    """Record, from now on, every progress text ("Denoising ...") the page shows."""
    page.evaluate(
        """() => {
            window.__progress = [];
            new MutationObserver(() => {
                const found = document.body.innerText.match(/Denoising[^\\n]*/);
                if (found) window.__progress.push(found[0]);
            }).observe(document.body, {subtree: true, childList: true, characterData: true});
        }"""
    )


def gallery_sources(page) -> list[str]:
    return page.locator("#gallery img").evaluate_all("images => images.map(i => i.src)")


def generate_and_wait(page, count: int, previous: list[str] | None = None) -> list[str]:
    """Click Generate; wait until the gallery shows `count` loaded images (different from `previous`)."""
    page.locator("#generate").click()
    page.wait_for_function(
        """([count, previous]) => {
            const images = [...document.querySelectorAll('#gallery img')];
            const sources = images.map(i => i.src);
            return images.length === count && images.every(i => i.complete && i.naturalWidth > 0)
                && JSON.stringify(sources) !== JSON.stringify(previous);
        }""",
        arg=[count, previous or []],
    )
    return gallery_sources(page)


def expect_error(page, text: str):
    toast = page.locator(".toast-body", has_text=text)
    expect(toast).to_be_visible()
    page.wait_for_function("el => getComputedStyle(el).opacity === '1'", arg=toast.element_handle())
    page.locator(".toast-body .toast-close").first.click()  # dismiss it so the next check starts clean
    expect(toast).to_have_count(0)


def png_files(page, sources: list[str]) -> list[bytes]:
    return [page.request.get(source).body() for source in sources]


# ---------------------------------------------------------------------------------------------------------------------
# Tests


def test_pick_two_classes_generate_and_see_progress(page, server):
    pick_classes(page, "3", "7")
    set_seed(page, "1234")
    watch_progress(page)
    sources = generate_and_wait(page, count=8)  # 2 classes × 4 images per class (the default)

    captions = page.locator("#gallery .caption-label").all_inner_texts()
    assert captions == ["3"] * 4 + ["7"] * 4
    widths = page.locator("#gallery img").evaluate_all("images => images.map(i => i.naturalWidth)")
    assert widths == [server.pipe.transformer.config.sample_size] * 8  # the model's resolution, not resized
    assert all(png.startswith(PNG_MAGIC) for png in png_files(page, sources))
    expect(page.locator("#grid img")).to_be_visible()
    progress = page.evaluate("window.__progress")
    assert any("Denoising" in text for text in progress), progress

    screenshot = os.environ.get("DIFFIT_SCREENSHOT")
    if screenshot:
        page.screenshot(path=screenshot, full_page=True)


def test_bad_seed_and_bad_class_show_a_message_and_keep_the_images(page):
    pick_classes(page, "1")
    set_seed(page, "5")
    sources = generate_and_wait(page, count=4)

    set_seed(page, "")
    page.locator("#generate").click()
    expect_error(page, "The seed is empty")
    assert gallery_sources(page) == sources

    set_seed(page, "123456789012345678901")
    page.locator("#generate").click()
    expect_error(page, "is too large")
    assert gallery_sources(page) == sources

    set_seed(page, "5")
    type_custom_class(page, "seven")
    page.locator("#generate").click()
    expect_error(page, "Unknown class label 'seven'. No close match. This model's classes are 0, 1, 2")
    assert gallery_sources(page) == sources
    assert page.locator("#gallery img").evaluate_all("images => images.every(i => i.naturalWidth > 0)")


def test_same_seed_twice_gives_identical_png_bytes(page):
    pick_classes(page, "2", "5")
    set_seed(page, "77")
    first_sources = generate_and_wait(page, count=8)
    set_seed(page, "78")
    other_sources = generate_and_wait(page, count=8, previous=first_sources)
    set_seed(page, "77")
    again_sources = generate_and_wait(page, count=8, previous=other_sources)
    first, other, again = (png_files(page, s) for s in (first_sources, other_sources, again_sources))
    assert first == again
    assert first != other


def test_random_classes_button_fills_the_picker(page):
    page.locator("#classes .remove-all").click()
    expect(page.locator("#classes .token")).to_have_count(0)
    page.locator("#random-classes").click()
    page.wait_for_function("() => document.querySelectorAll('#classes .token').length >= 2")


def test_gradio_client_calls_generate(server, app):
    client = Client(server.url, verbose=False)
    gallery, grid, seed = client.predict(
        classes=["3", "7"], images_per_class=2, seed=11, randomize_seed=False, api_name="/generate"
    )
    assert seed == 11 and [item["caption"] for item in gallery] == ["3", "3", "7", "7"]
    assert all(Path(item["image"]).read_bytes().startswith(PNG_MAGIC) for item in gallery)
    assert Path(grid).read_bytes().startswith(PNG_MAGIC)
    # the same images as the app's own function with the page's defaults
    defaults = app.recipe_defaults(server.pipe)
    expected = app.generate(
        server.pipe,
        ["3", "7"],
        2,
        defaults.steps,
        defaults.guidance_scale,
        defaults.guidance_schedule,
        defaults.scheduler,
        11,
    )
    for item, image in zip(gallery, expected.images):
        assert np.array_equal(np.asarray(Image.open(item["image"])), np.asarray(image))

    with pytest.raises(Exception, match="The seed is empty"):
        client.predict(classes=["3"], seed=None, api_name="/generate")
