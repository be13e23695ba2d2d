"""The Space as a person uses it, in a real browser (Debian's Chromium driven by Playwright), and through
`gradio_client`. The app serves the two models shipped in the package ("digits", the default, and "digits-latent")
on 127.0.0.1.

These tests fail, not skip, when Chromium or Playwright is missing (CI installs both, see .ci/run); set
DIFFIT_SKIP_UI=1 to skip the browser part explicitly. DIFFIT_SCREENSHOT=path saves the screenshot of docs/space.md.
"""

import io
import os
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from tests.utils import load_app, served_demo


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT_MS = 120_000  # generous: the CI machine's two cores may be shared


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def server(app):
    with served_demo(app) as (_, url, models):
        yield types.SimpleNamespace(url=url, pipe=models["digits"][0], latent=models["digits-latent"][0])


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


def pick_model(page, name: str, pipe):
    """Click the model's entry in the Model picker; wait for the model line to name its denoiser."""
    page.get_by_test_id(f"{name}-radio-label").click()
    expect(page.get_by_test_id(f"{name}-radio-label")).to_have_class(re.compile("selected"))
    expect(page.locator("#model-description")).to_contain_text(type(pipe.transformer).__name__)


def open_sampling_settings(page):
    page.get_by_role("button", name="Sampling settings").click()
    expect(page.locator("#steps")).to_be_visible()


def scheduler_options(page) -> list[str]:
    """The labels the Scheduler dropdown offers (the settings open)."""
    page.locator("#scheduler input").click()
    options = page.locator("ul[role=listbox] li[role=option]")
    expect(options.first).to_be_visible()
    labels = [text.replace("✓", "").strip() for text in options.all_inner_texts()]
    page.keyboard.press("Escape")
    return labels


def set_steps(page, steps: str):
    """Type the step count (the settings open): the stand-in latent model's saved recipe is too slow for a test."""
    box = page.locator("#steps input[type=number]")
    box.fill(steps)
    box.press("Enter")


def image_widths(page) -> list[int]:
    return page.locator("#gallery img").evaluate_all("images => images.map(i => i.naturalWidth)")


# ---------------------------------------------------------------------------------------------------------------------
# Tests


def test_pick_two_classes_generate_and_see_progress(page, server):
    pick_classes(page, "3", "7")
    set_seed(page, "1234")
    watch_progress(page)
    sources = generate_and_wait(page, count=8)  # 2 classes × 4 images per class (the default)

    captions = page.locator("#gallery .caption-label").all_inner_texts()
    assert captions == ["3"] * 4 + ["7"] * 4
    assert image_widths(page) == [server.pipe.transformer.config.sample_size] * 8  # the model's resolution
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
    gallery, grid, seed = client.predict(  # no `model`: the default one, as clients written before the picker
        classes=["3", "7"], images_per_class=2, seed=11, randomize_seed=False, api_name="/generate"
    )
    assert seed == 11 and [item["caption"] for item in gallery] == ["3", "3", "7", "7"]
    side = server.pipe.transformer.config.sample_size
    assert [Image.open(item["image"]).size for item in gallery] == [(side, side)] * 4
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


def test_model_picker_switches_the_choices_and_the_model(page, server, app):
    assert [label.strip() for label in page.locator("#model label").all_inner_texts()] == ["digits", "digits-latent"]
    expect(page.get_by_test_id("digits-radio-label")).to_have_class(re.compile("selected"))  # the default
    open_sampling_settings(page)
    assert scheduler_options(page) == [label for label, _ in app.scheduler_choices(server.pipe)]

    pick_model(page, "digits-latent", server.latent)
    assert scheduler_options(page) == [label for label, _ in app.scheduler_choices(server.latent)]
    expect(page.locator("#steps input[type=number]")).to_have_value(str(app.recipe_defaults(server.latent).steps))
    set_steps(page, "2")
    pick_classes(page, "3")
    set_seed(page, "5")
    sources = generate_and_wait(page, count=4)
    assert image_widths(page) == [32] * 4  # the VAE's 32×32 images
    # the latent model sampled them, with its own recipe and the two steps typed
    latent = app.recipe_defaults(server.latent)
    expected = app.generate(server.latent, ["3"], 4, 2, latent.guidance_scale, latent.guidance_schedule, "default", 5)
    for png, image in zip(png_files(page, sources), expected.images):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(image))

    pick_model(page, "digits", server.pipe)
    assert scheduler_options(page) == [label for label, _ in app.scheduler_choices(server.pipe)]
    generate_and_wait(page, count=8, previous=sources)  # the default classes, 4 images each
    assert image_widths(page) == [server.pipe.transformer.config.sample_size] * 8


def test_an_example_of_the_other_model_switches_to_it(page, server, app):
    values = app.example_rows(server.latent)[0]
    page.locator("#examples tbody tr").nth(len(app.example_rows(server.pipe))).click()  # the latent model's first
    expect(page.get_by_test_id("digits-latent-radio-label")).to_have_class(re.compile("selected"))
    expect(page.locator("#model-description")).to_contain_text(type(server.latent.transformer).__name__)
    for name in values.classes:
        expect(page.locator("#classes .token", has_text=name)).to_be_visible()
    open_sampling_settings(page)
    expect(page.locator("#scheduler input")).to_have_value(app.scheduler_label(server.latent, values.scheduler))
    expect(page.locator("#steps input[type=number]")).to_have_value(str(values.steps))
    set_steps(page, "2")
    generate_and_wait(page, count=len(values.classes) * values.images_per_class)
    assert set(image_widths(page)) == {32}


def test_gradio_client_picks_the_model(server, app):
    client = Client(server.url, verbose=False)
    defaults = app.recipe_defaults(server.latent)  # what the API takes for the recipe left out: the model's own
    scheduler = app.scheduler_choices(server.latent)[1][1]  # not one of the first model's choices
    gallery, grid, seed = client.predict(
        classes=["3"],
        images_per_class=2,
        steps=2,
        scheduler=scheduler,
        seed=4,
        randomize_seed=False,
        model="digits-latent",
        api_name="/generate",
    )
    assert seed == 4 and [Image.open(item["image"]).size for item in gallery] == [(32, 32)] * 2
    expected = app.generate(
        server.latent, ["3"], 2, 2, defaults.guidance_scale, defaults.guidance_schedule, scheduler, 4
    )
    for item, image in zip(gallery, expected.images):
        assert np.array_equal(np.asarray(Image.open(item["image"])), np.asarray(image))

    with pytest.raises(Exception, match="not in the list of choices"):
        client.predict(classes=["3"], model="digits-xl", api_name="/generate")
    with pytest.raises(Exception, match="Scheduler must be one of default, "):
        client.predict(classes=["3"], scheduler="no-such-scheduler", model="digits-latent", api_name="/generate")
