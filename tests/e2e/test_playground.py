"""The web playground (issue 14) in a real browser: headless Chromium driven by Playwright (tests/browser.py).

One in-process server with fault-injection workers serves the module (a prompt with a gate marker holds the worker
until the test opens the gate, so "queued", "running" and "cancel while running" mean the same on any machine); a
second one has API keys. Jobs are 64x64 and two steps. Every job a test starts from the page is checked through the
API afterwards: the page must have sent what the user asked for, and the server must have run it.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from tests.browser import (
    VIEWPORT,
    choose_file,
    data_uri_image,
    drop_file,
    launch_chromium,
    open_playground,
    png_data,
    posted_json,
)
from tests.conftest import FAULT_SERVER, Gates, ServerFactory, held
from tests.server import GenServeProcess, wait_until

pytestmark = pytest.mark.e2e

# Playwright's assertions retry this long: generous, as the 2 cores are shared with the workers and other tests.
expect.set_options(timeout=15_000)

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
QUEUE_MAX = 2  # small, so one test can fill the queue and see the server's 429 shown in the page
ARTIST_KEY = "artist-key-0123456789"  # generate + read
VIEWER_KEY = "viewer-key-0123456789"  # read only: may look, may not generate
HISTORY_PROMPTS = ["a red fox in fresh snow", "a glass house in a pine forest", "koi in a moonlit pond"]
POOL_REFRESH_MS = 2000  # genserve/ui/assets/js/pool.js REFRESH_MS
SCREENSHOT_ENV = "GENSERVE_PLAYGROUND_SCREENSHOT"  # a path: the screenshot test also writes the README's image there


@pytest.fixture(scope="module")
def server(start_server: ServerFactory) -> GenServeProcess:
    return start_server({"defaults": SMALL, "queue": {"max_size": QUEUE_MAX}}, module=FAULT_SERVER, in_process=True)


@pytest.fixture(scope="module")
def keyed(start_server: ServerFactory) -> GenServeProcess:
    keys = [
        {"name": "artist", "key": ARTIST_KEY, "scopes": ["generate", "read"]},
        {"name": "viewer", "key": VIEWER_KEY, "scopes": ["read"]},
    ]
    return start_server({"defaults": SMALL, "auth": {"keys": keys}}, in_process=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


class Watched:
    """A page with what it did recorded: every URL it requested, and every uncaught error (a failed test unless
    the test expects it)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.urls: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda request: self.urls.append(request.url))
        page.on("pageerror", lambda error: self.errors.append(str(error)))


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)  # fresh local storage per test
    watched = Watched(context.new_page())
    yield watched
    # A route handler (the proxy test's) may still be answering the page's last poll: drop the routes first and
    # ignore what such a handler raises once its page is gone, or the sync API raises it in the next test's call.
    watched.page.unroute_all(behavior="ignoreErrors")
    context.close()
    assert not watched.errors, f"uncaught errors in the page: {watched.errors}"


def api(server: GenServeProcess, path: str, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    answer = requests.get(f"{server.url}{path}", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def submitted_job(page: Page) -> str:
    """The id of the job the page is watching."""
    expect(page.locator("#job-body")).to_have_attribute("data-job-id", re.compile(r"^[0-9a-f]{32}$"))
    job_id = page.get_attribute("#job-body", "data-job-id")
    assert job_id is not None
    return job_id


def wait_for_result(page: Page, timeout: float = 60_000) -> None:
    expect(page.locator("#job-body")).to_have_attribute("data-status", "completed", timeout=timeout)
    expect(page.locator("#result")).to_be_visible()
    page.wait_for_function("document.querySelector('#result-image').naturalWidth > 0")


def set_prompt_and_size(page: Page, prompt: str, size: int = 64, steps: int = 2) -> None:
    page.fill("#prompt", prompt)
    page.fill("#width", str(size))
    page.fill("#height", str(size))
    page.fill("#num_inference_steps", str(steps))


def generate(page: Page) -> dict[str, Any]:
    """Click Generate; the JSON body the page POSTed to /jobs."""
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/jobs")) as posted:
        page.click("#generate")
    return posted_json(posted.value)


def choose_mode(page: Page, mode: str) -> None:
    """Click the mode's pill, as a user does (the radio inside it is invisible)."""
    page.click(f"label.mode:has(input[value={mode}])")
    expect(page.locator(f"input[name=mode][value={mode}]")).to_be_checked()


def record_progress(page: Page) -> None:
    """Keep every value the progress bar takes (window.progressSeen), however fast they follow each other."""
    page.evaluate(
        """() => {
            window.progressSeen = [];
            const bar = document.querySelector('#progress');
            new MutationObserver((records) => {
                for (const record of records) {
                    window.progressSeen.push(Number(record.target.getAttribute('aria-valuenow')));
                }
            }).observe(bar, { attributes: true, attributeFilter: ['aria-valuenow'] });
        }"""
    )


# --- the README's screenshot ----------------------------------------------------------------------------------


def test_screenshot_of_a_real_run(server: GenServeProcess, watched: Watched, tmp_path: Path) -> None:
    """A 1280-px-wide picture of the page after a real job, small enough for the repository. With
    GENSERVE_PLAYGROUND_SCREENSHOT=docs/playground.png it is also written there (the README shows that file)."""
    for prompt in HISTORY_PROMPTS:  # a history to show (this test runs first: these are all the server has)
        made = requests.post(f"{server.url}/jobs", json={"prompt": prompt, "width": 128, "height": 128}, timeout=30)
        server.completed_job(made.json()["task_id"])
    page = watched.page
    open_playground(page, f"{server.url}/")
    set_prompt_and_size(page, "A lighthouse on a cliff at dusk, volumetric light", size=256, steps=4)
    generate(page)
    wait_for_result(page)
    page.click("#history-refresh")
    expect(page.locator("#gallery li").first).to_be_visible()
    page.wait_for_timeout(500)  # the thumbnails' fetches and the pool's next refresh
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as image:
        assert image.width == VIEWPORT["width"]
    small = compress(shot)
    assert small.stat().st_size < 200_000, small.stat().st_size
    target = os.environ.get(SCREENSHOT_ENV)
    if target:
        shutil.copyfile(small, target)


def compress(path: Path) -> Path:
    """The screenshot as a palette PNG: a UI is mostly flat colours, so 256 of them keep it sharp at a third of the
    size."""
    out = path.with_name(f"{path.stem}-small.png")
    with Image.open(path) as image:
        buffer = io.BytesIO()
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
    out.write_bytes(buffer.getvalue())
    return out


# --- served, offline, behind a prefix ---------------------------------------------------------------------------


def test_page_is_served_at_root_to_browsers_and_at_ui(server: GenServeProcess) -> None:
    for path in ("/", "/ui"):
        page = requests.get(f"{server.url}{path}", headers={"Accept": "text/html,*/*;q=0.8"}, timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), path
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert '<script type="module" src="ui/assets/js/main.js">' in page.text
        # Relative URLs only: an absolute path would escape a reverse proxy's prefix.
        assert not re.search(r"""(src|href)=["']/""", page.text)
    # API clients (curl's */*) still get the JSON; it names the page.
    assert requests.get(f"{server.url}/", timeout=10).json()["playground"] == "/ui"
    slash = requests.get(f"{server.url}/ui/", allow_redirects=False, timeout=10)
    assert slash.status_code == 308 and slash.headers["location"] == "../ui"
    script = requests.get(f"{server.url}/ui/assets/js/api.js", timeout=10)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    style = requests.get(f"{server.url}/ui/assets/playground.css", timeout=10)
    assert style.headers["content-type"].startswith("text/css")


def test_the_page_loads_nothing_from_anywhere_else(server: GenServeProcess, watched: Watched) -> None:
    open_playground(watched.page, f"{server.url}/")
    expect(watched.page.locator("#workers tr")).to_have_count(1)  # the pool panel has answered too
    ours = (server.url + "/", "data:", f"blob:{server.url}/")
    assert watched.urls and not [url for url in watched.urls if not url.startswith(ours)]
    modes = watched.page.locator("input[name=mode]")
    assert [modes.nth(i).get_attribute("value") for i in range(modes.count())] == api(server, "/models")[0]["modes"]


def test_works_behind_a_reverse_proxy_path_prefix(server: GenServeProcess, watched: Watched) -> None:
    """The browser sees the server only under /genserve/ (as behind a proxy that strips the prefix); every request
    the page makes must stay under it, and a whole job must run through it."""
    page = watched.page
    prefix = f"{server.url}/genserve"

    def proxy(route: Route) -> None:
        upstream = route.fetch(url=server.url + route.request.url[len(prefix) :])
        route.fulfill(response=upstream)

    page.route(f"{prefix}/**", proxy)
    page.route(f"{prefix}/", proxy)
    open_playground(page, f"{prefix}/")
    set_prompt_and_size(page, "through a proxy")
    generate(page)
    wait_for_result(page)
    outside = [url for url in watched.urls if not url.startswith((prefix + "/", "data:", "blob:"))]
    assert not outside, outside


def test_pool_panel_refreshes_only_while_the_page_is_visible(server: GenServeProcess, watched: Watched) -> None:
    page = watched.page
    open_playground(page, f"{server.url}/")
    expect(page.locator("#workers tr[data-slot='0']")).to_contain_text("cpu")

    def set_visibility(state: str) -> None:
        page.evaluate(
            """(state) => {
                Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => state });
                document.dispatchEvent(new Event('visibilitychange'));
            }""",
            state,
        )

    set_visibility("hidden")
    page.wait_for_timeout(300)  # a refresh already on its way lands
    asked = sum(url.endswith("/status") for url in watched.urls)
    page.wait_for_timeout(2 * POOL_REFRESH_MS + 500)
    assert sum(url.endswith("/status") for url in watched.urls) == asked  # a hidden tab costs the server nothing
    with page.expect_request(lambda request: request.url.endswith("/status"), timeout=1000):
        set_visibility("visible")  # back: at once, not at the next tick


# --- every mode -----------------------------------------------------------------------------------------------


def test_text2img_waits_in_line_then_shows_progress_to_100_and_downloads(
    server: GenServeProcess, watched: Watched, gate: str
) -> None:
    page = watched.page
    holder = requests.post(f"{server.url}/jobs", json=held(gate), timeout=30).json()["task_id"]
    wait_until(lambda: api(server, f"/jobs/{holder}")["status"] == "running", 30, what="the holding job to run")
    open_playground(page, f"{server.url}/")
    # The pool panel: the one worker is busy with the holding job.
    worker = page.locator("#workers tr[data-slot='0']")
    expect(worker).to_have_attribute("data-state", "busy")
    expect(worker).to_contain_text(holder[:8])
    expect(worker).to_contain_text("cpu")

    set_prompt_and_size(page, "a lighthouse at dusk")
    page.fill("#seed", "1234")
    record_progress(page)
    body = generate(page)
    assert body["mode"] == "text2img" and body["seed"] == 1234 and body["width"] == 64
    job_id = submitted_job(page)
    expect(page.locator("#job-status")).to_have_text("Queued · next in line")
    expect(page.locator("#queue")).to_contain_text(job_id[:8])  # the pool panel's queue lists it too
    Gates().open(gate)

    wait_for_result(page)
    seen = page.evaluate("window.progressSeen")
    assert 100 in seen and seen == sorted(seen), seen  # a bar that only goes forward, to the end
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100")
    view = server.completed_job(job_id)
    assert view["params"]["seed"] == 1234 and view["params"]["prompt"] == "a lighthouse at dusk"
    expect(page.locator("#result-facts")).to_contain_text("1234")
    expect(page.locator("#result-facts")).to_contain_text("64×64")

    for format_name, magic in (("png", b"\x89PNG"), ("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):
        with page.expect_download() as download:
            page.click(f"#result .download[data-format={format_name}]")
        path = download.value.path()
        assert path is not None
        assert Path(path).read_bytes()[:4].startswith(magic), format_name
        extension = "jpg" if format_name == "jpeg" else format_name
        assert download.value.suggested_filename == f"genserve-{job_id}.{extension}"


def test_random_seed_and_reuse_last_seed(server: GenServeProcess, watched: Watched) -> None:
    page = watched.page
    open_playground(page, f"{server.url}/")
    set_prompt_and_size(page, "a random seed")
    page.click("#seed-random")
    assert generate(page)["seed"] == -1  # the server picks it
    wait_for_result(page)
    used = server.completed_job(submitted_job(page))["params"]["seed"]
    page.click("#seed-reuse")
    expect(page.locator("#seed")).to_have_value(str(used))  # all digits, up to 2^63-1
    assert generate(page)["seed"] == used


def test_img2img_dropped_image_with_strength(server: GenServeProcess, watched: Watched) -> None:
    page = watched.page
    open_playground(page, f"{server.url}/")
    choose_mode(page, "img2img")
    set_prompt_and_size(page, "the same in winter")
    drop_file(page, ".image-input[data-field=input_image] .drop", png_data((80, 48)), "street.png")
    expect(page.locator(".image-input[data-field=input_image] .image-size")).to_have_text("street.png · 80×48")
    page.fill("#strength", "0.5")
    body = generate(page)
    assert data_uri_image(body["input_image"]).size == (80, 48) and body["strength"] == 0.5
    wait_for_result(page)
    view = server.completed_job(submitted_job(page))
    assert view["mode"] == "img2img" and view["params"]["images"] == ["input_image"]
    assert view["params"]["strength"] == 0.5


def test_fill_sends_the_painted_mask_at_the_image_size(server: GenServeProcess, watched: Watched) -> None:
    page = watched.page
    open_playground(page, f"{server.url}/")
    choose_mode(page, "fill")
    set_prompt_and_size(page, "a flower bed")
    image_size = (96, 64)  # not the output size, and not square: the mask must follow the image
    choose_file(page, "input_image", png_data(image_size), "garden.png")
    canvas = page.locator("#mask-canvas")
    expect(canvas).to_be_visible()
    box = canvas.bounding_box()
    assert box is not None

    def at(fx: float, fy: float) -> tuple[float, float]:
        return box["x"] + fx * box["width"], box["y"] + fy * box["height"]

    page.fill("#brush-size", "12")
    page.mouse.move(*at(0.15, 0.5))  # paint a stroke across the middle…
    page.mouse.down()
    page.mouse.move(*at(0.85, 0.5), steps=8)
    page.mouse.up()
    page.check("input[name=mask-tool][value=erase]")  # …and rub out its right end
    page.fill("#brush-size", "40")
    page.mouse.move(*at(0.7, 0.5))
    page.mouse.down()
    page.mouse.move(*at(0.95, 0.5), steps=4)
    page.mouse.up()

    body = generate(page)
    mask = data_uri_image(body["mask_image"]).convert("L")
    assert mask.size == image_size == data_uri_image(body["input_image"]).size
    width, height = image_size

    def pixel(fx: float, fy: float) -> int:
        value = mask.getpixel((int(fx * width), int(fy * height)))
        assert isinstance(value, int)
        return value

    assert pixel(0.3, 0.5) == 255  # painted: repaint
    assert pixel(0.8, 0.5) == 0  # painted, then erased: keep
    assert pixel(0.3, 0.1) == 0 and pixel(0.05, 0.95) == 0  # never painted
    assert {value for _, value in mask.getcolors() or []} == {0, 255}  # black and white, nothing in between
    wait_for_result(page)
    view = server.completed_job(submitted_job(page))
    assert view["mode"] == "fill" and view["params"]["images"] == ["input_image", "mask_image"]


def test_fill_without_a_painted_mask_is_refused_in_the_page(server: GenServeProcess, watched: Watched) -> None:
    page = watched.page
    open_playground(page, f"{server.url}/")
    choose_mode(page, "fill")
    page.fill("#prompt", "a pond")
    choose_file(page, "input_image", png_data((64, 64)), "garden.png")
    posts_before = sum(url.endswith("/jobs") for url in watched.urls)
    page.click("#mask-clear")
    page.click("#generate")
    expect(page.locator("[data-error-for=mask_image]")).to_have_text("Paint the area to repaint on the image.")
    assert sum(url.endswith("/jobs") for url in watched.urls) == posts_before  # nothing was sent


def test_controlnet_with_type_and_init_image(server: GenServeProcess, watched: Watched) -> None:
    page = watched.page
    open_playground(page, f"{server.url}/")
    choose_mode(page, "controlnet")
    set_prompt_and_size(page, "a glass house")
    choose_file(page, "control_image", png_data((64, 64), (0, 0, 0)), "edges.png")
    expect(page.locator("#strength-field")).to_be_hidden()  # no init image: nothing to keep a strength of
    choose_file(page, "input_image", png_data((64, 64)), "house.png")
    expect(page.locator("#strength-field")).to_be_visible()
    page.select_option("#controlnet_type", "depth")
    body = generate(page)
    assert body["controlnet_type"] == "depth" and "control_image" in body and "input_image" in body
    wait_for_result(page)
    view = server.completed_job(submitted_job(page))
    assert view["mode"] == "controlnet" and view["params"]["controlnet_type"] == "depth"
    assert view["params"]["images"] == ["control_image", "input_image"] and "strength" in view["params"]


def test_redux_variation_without_a_prompt(server: GenServeProcess, watched: Watched) -> None:
    page = watched.page
    open_playground(page, f"{server.url}/")
    choose_mode(page, "redux")
    page.fill("#prompt", "")
    expect(page.locator("#cfg")).to_have_value("2.5")  # Redux's own default guidance
    choose_file(page, "input_image", png_data((64, 64)), "vase.png")
    generate(page)
    wait_for_result(page)
    assert server.completed_job(submitted_job(page))["mode"] == "redux"


# --- errors -----------------------------------------------------------------------------------------------------


def test_limits_are_checked_in_the_page(server: GenServeProcess, watched: Watched) -> None:
    page = watched.page
    open_playground(page, f"{server.url}/")
    limits = api(server, "/models")[0]["limits"]
    page.fill("#prompt", "p")
    page.fill("#width", str(limits["max_size"] + 16))
    page.fill("#num_inference_steps", "0")
    page.fill("#seed", "12x")
    page.click("#generate")
    expect(page.locator("[data-error-for=width]")).to_contain_text(f"{limits['min_size']} to {limits['max_size']}")
    expect(page.locator("[data-error-for=num_inference_steps]")).to_contain_text(f"to {limits['max_steps']}")
    expect(page.locator("[data-error-for=seed]")).to_be_visible()
    expect(page.locator("#width")).to_have_attribute("aria-invalid", "true")
    assert not any(url.endswith("/jobs") for url in watched.urls)


def test_a_server_error_is_shown_with_its_message(server: GenServeProcess, watched: Watched, gate: str) -> None:
    """The queue is full (one job running, QUEUE_MAX waiting): the server answers 429, and the page shows why."""
    held_ids = [
        requests.post(f"{server.url}/jobs", json=held(gate), timeout=30).json()["task_id"] for _ in range(QUEUE_MAX + 1)
    ]
    answer = requests.post(f"{server.url}/jobs", json={"prompt": "one too many", **SMALL}, timeout=30)
    assert answer.status_code == 429
    page = watched.page
    open_playground(page, f"{server.url}/")
    set_prompt_and_size(page, "one too many")
    generate(page)
    expect(page.locator("#form-error")).to_have_text(answer.json()["detail"])
    Gates().open(gate)
    for job_id in held_ids:
        server.completed_job(job_id)


# --- cancel, history ------------------------------------------------------------------------------------------


def test_cancel_a_running_job(server: GenServeProcess, watched: Watched, gate: str) -> None:
    page = watched.page
    open_playground(page, f"{server.url}/")
    set_prompt_and_size(page, Gates.marker(gate))  # holds the worker until the gate opens: "long", on any machine
    generate(page)
    job_id = submitted_job(page)
    expect(page.locator("#job-status")).to_contain_text("Running on worker 0 (cpu)")
    page.click("#cancel")
    expect(page.locator("#job-status")).to_have_text("Canceled")
    expect(page.locator("#progress-text")).to_have_text("Reason: canceled by client")
    expect(page.locator("#cancel")).to_be_hidden()
    view = api(server, f"/jobs/{job_id}")
    assert view["status"] == "canceled" and view["cancel_reason"] == "canceled by client"


def test_open_a_history_item_and_reuse_its_settings(server: GenServeProcess, watched: Watched) -> None:
    made = requests.post(
        f"{server.url}/jobs", json={"prompt": "from the history", "seed": 777, "cfg": 4.5, **SMALL}, timeout=30
    ).json()["task_id"]
    server.completed_job(made)
    page = watched.page
    open_playground(page, f"{server.url}/")
    card = page.locator(f"#gallery li[data-job-id='{made}']")
    expect(card).to_be_visible()
    page.wait_for_function(f"document.querySelector(\"#gallery li[data-job-id='{made}'] img\")?.naturalWidth > 0")
    card.locator("button").click()
    wait_for_result(page)
    facts = page.locator("#result-facts")
    expect(facts).to_contain_text("from the history")
    expect(facts).to_contain_text("777")
    page.click("#use-settings")
    expect(page.locator("#prompt")).to_have_value("from the history")
    expect(page.locator("#seed")).to_have_value("777")
    expect(page.locator("#cfg")).to_have_value("4.5")


# --- keys -------------------------------------------------------------------------------------------------------


def test_keyed_server_serves_the_page_but_not_the_data_without_a_key(keyed: GenServeProcess) -> None:
    page = requests.get(f"{keyed.url}/", headers={"Accept": "text/html"}, timeout=10)
    assert page.status_code == 200 and "GenServe playground" in page.text
    assert requests.get(f"{keyed.url}/ui/assets/js/main.js", timeout=10).status_code == 200
    assert requests.get(f"{keyed.url}/", timeout=10).status_code == 401  # the JSON answer stays behind the keys
    assert requests.get(f"{keyed.url}/models", timeout=10).status_code == 401


def test_keyed_server_asks_for_a_key_keeps_it_and_explains_403(keyed: GenServeProcess, watched: Watched) -> None:
    page = watched.page
    page.goto(f"{keyed.url}/")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-reason")).to_contain_text("This server needs an API key (401)")
    expect(page.locator("#notice")).to_contain_text("needs an API key")

    page.fill("#key-input", "not-a-key-at-all")
    page.click("#key-save")
    expect(page.locator("#key-reason")).to_contain_text("The server refused the API key (401")

    page.fill("#key-input", ARTIST_KEY)
    page.click("#key-save")
    expect(dialog).to_be_hidden()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    set_prompt_and_size(page, "made with a key")
    generate(page)
    wait_for_result(page)  # events and the image came through fetch() with the Bearer header
    job_id = submitted_job(page)
    assert api(keyed, f"/jobs/{job_id}", ARTIST_KEY)["owner"] == "artist"

    page.reload()  # the key was kept in local storage: no question this time
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(dialog).to_be_hidden()
    expect(page.locator(f"#gallery li[data-job-id='{job_id}']")).to_be_visible()

    page.click("#key-button")  # a key that may read but not generate: the page says so when it is refused
    page.fill("#key-input", VIEWER_KEY)
    page.click("#key-save")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    set_prompt_and_size(page, "not allowed")
    generate(page)
    expect(page.locator("#form-error")).to_contain_text("(403: API key 'viewer' lacks the 'generate' scope")
