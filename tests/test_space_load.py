"""The Space under load, scaled down for CI (benchmarks/space_load.py is the full run): 6 callers at once against a
queue of at most 3 waiting requests, through `gradio_client`; a caller that leaves mid-run frees its slot; an API call
that names only the model gets that model's saved recipe."""

import logging
import uuid

import httpx
import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from benchmarks.space_load import BUSY, QueueWatcher, call_together
from tests.utils import load_app, served_demo


QUEUE_SIZE = 3


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def server(app):
    with served_demo(app, queue_size=QUEUE_SIZE) as served:
        yield served


def test_six_callers_get_images_or_busy_and_none_is_lost(server):
    _, url, _ = server
    # ~1 s per request on a busy CPU: all six arrive while the first runs, so 1 runs, 3 wait and 2 are turned away
    request = dict(classes=["3"], images_per_class=2, steps=8, seed=1, model="digits")
    with QueueWatcher(url, interval=0.05) as watcher:
        outcomes = call_together(url, 6, timeout=300, **request)
    kinds = [outcome.kind for outcome in outcomes]
    assert set(kinds) <= {"images", BUSY}, [o.detail for o in outcomes if o.kind == "error"]
    assert kinds.count("images") >= QUEUE_SIZE and kinds.count(BUSY) >= 1, kinds  # every waiting one was served
    assert all(o.detail == "2" for o in outcomes if o.kind == "images")
    assert all("Queue is full" in o.detail and "try again" in o.detail for o in outcomes if o.kind == BUSY)
    assert watcher.deepest <= QUEUE_SIZE


def generate_fn_index(demo) -> int:
    (index,) = [index for index, fn in demo.fns.items() if fn.api_name == "generate"]
    return index


def test_a_caller_who_leaves_mid_run_frees_the_slot(server, caplog):
    demo, url, _ = server
    caplog.set_level(logging.INFO, logger="diffit-space")
    # the longest request the Space takes (16 images, 250 steps: about a minute here); its caller leaves once it runs
    session = uuid.uuid4().hex
    data = [[str(i) for i in range(2)], 8, 250, None, None, None, 0, False, "digits"]
    join = httpx.post(
        url + "gradio_api/queue/join",
        json=dict(data=data, fn_index=generate_fn_index(demo), session_hash=session, event_data=None, trigger_id=None),
    )
    join.raise_for_status()
    with httpx.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}, timeout=60) as stream:
        for line in stream.iter_lines():
            if '"progress"' in line:  # sampling has started; then the connection closes, as a closed tab's does
                break

    # the next caller is served; the left request stopped long before its last step
    gallery, _, _ = Client(url, verbose=False).predict(
        classes=["5"], images_per_class=1, steps=2, api_name="/generate"
    )
    assert len(gallery) == 1
    stopped = [r.getMessage() for r in caplog.records if "client left" in r.getMessage()]
    assert len(stopped) == 1, stopped
    done = int(stopped[0].split("after step ")[1].split(" ")[0])
    assert done < 250 and "of 250" in stopped[0]


def test_api_call_naming_only_the_model_gets_that_models_recipe(server, app):
    _, url, models = server
    latent = models["digits-latent"][0]
    recipe = app.recipe_defaults(latent)
    digits_recipe = app.recipe_defaults(models["digits"][0])
    assert (recipe.steps, recipe.guidance_scale) != (digits_recipe.steps, digits_recipe.guidance_scale)
    gallery, _, seed = Client(url, verbose=False).predict(
        classes=["3"], images_per_class=2, model="digits-latent", api_name="/generate"
    )
    expected = app.generate(
        latent, ["3"], 2, recipe.steps, recipe.guidance_scale, recipe.guidance_schedule, recipe.scheduler, seed
    )
    for item, image in zip(gallery, expected.images, strict=True):
        assert np.array_equal(np.asarray(Image.open(item["image"])), np.asarray(image))
