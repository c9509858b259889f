"""The studio served: its documented API through ``gradio_client`` and its controls in Chromium (Playwright).

One server and one browser page for the module. Each control is checked by what it produces: images are
fetched from the page and compared pixel for pixel with the same request made directly on the studio.
Chromium must be installed at /usr/bin/chromium; without it these tests fail (they never download one).
"""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffadapt as da
from diffadapt.infotext import load_png, read
from diffadapt.studio import Request, Slot, demo_studio
from diffadapt.testing import tiny_sd1_pipeline

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
CHROMIUM = "/usr/bin/chromium"
SIZE, STEPS = 32, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from diffadapt.studio.app import CSS, build_app

    studio = demo_studio(tmp_path_factory.mktemp("adapters"), default_steps=STEPS)
    studio.size = SIZE
    app = build_app(studio)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=CSS)
    yield f"http://127.0.0.1:{port}/", studio
    app.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


@pytest.fixture(scope="module")
def page(server):
    assert Path(CHROMIUM).is_file(), f"the browser tests need Chromium at {CHROMIUM} (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(server[0], wait_until="domcontentloaded")
        page.wait_for_selector("#generate")
        for name in server[1].available():  # the cards as the page load sees them (the first render is older)
            page.get_by_role("button", name=f"+ {name}", exact=True).wait_for()
        yield page
        browser.close()


def px(data: bytes | Image.Image) -> np.ndarray:
    im = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    return np.asarray(im.convert("RGB"), dtype=np.float64)


def direct(studio, prompt="a photo of a cat", slots=None, seed=0) -> np.ndarray:
    return px(studio.generate(Request(prompt, seed=seed, steps=STEPS, width=SIZE, height=SIZE), slots)[0].image)


# -- the API ------------------------------------------------------------------------------------------


def test_api_lists_the_documented_endpoints(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(api) == {"/adapters", "/generate", "/merge"}
    assert [p["parameter_name"] for p in api["/generate"]["parameters"]] == [
        "prompt", "negative_prompt", "seed", "steps", "cfg", "width", "height", "sampler"]
    assert [p["parameter_name"] for p in api["/merge"]["parameters"]] == ["tags", "name", "method", "rank"]
    cards = {c["name"]: c for c in client.predict(api_name="/adapters")}
    assert cards["film"]["methods"] == ["loha"] and cards["ink"]["trigger_words"] == ["ink wash"]
    assert cards["grain"]["preview"] == "grain.preview.png" and cards["grain"]["ranks"] == [4]


def test_api_generate_png_and_twelve_concurrent_requests(client, server):
    studio = server[1]
    jobs = [(f"a cat <lora:{n}:{w}>", "blurry" if s % 2 else "", s) for s, (n, w) in
            enumerate([("ink", 0.8), ("film", -1), ("grain", 0.5), ("ink", 0.3)] * 3)]
    alone = [px(studio.generate(Request(p, neg, seed=s, steps=STEPS, width=SIZE, height=SIZE))[0].image)
             for p, neg, s in jobs]
    submitted = [client.submit(p, neg, s, STEPS, 7.0, SIZE, SIZE, "Euler", api_name="/generate") for p, neg, s in jobs]
    for (prompt, neg, seed), job, want in zip(jobs, submitted, alone):
        path, text = job.result(timeout=120)
        with Image.open(path) as im:
            assert im.format == "PNG" and im.info["parameters"] == text
            assert np.array_equal(px(im), want)
        info = load_png(path)
        assert info.prompt == prompt and info.negative_prompt == neg and info.params["Seed"] == str(seed)
    with pytest.raises(Exception, match="adapter folder"):
        client.predict("a cat <lora:../../x:1>", "", 0, 1, 7.0, SIZE, SIZE, "Euler", api_name="/generate")


def test_api_merge_returns_the_file(client, server):
    path, info = client.predict("<lora:ink:0.6> <lora:grain:0.4>", "api-mix", "svd", 4, api_name="/merge")
    assert info["name"] == "api-mix" and 0 < info["rel_error"] < 1
    assert Path(path).read_bytes() == (server[1].adapter_dir / "api-mix.safetensors").read_bytes()
    assert set(da.inspect(path).methods) == {"lora"}
    for name in ("../../../x", "/tmp/x"):
        with pytest.raises(Exception, match="adapter folder|absolute"):
            client.predict("<lora:ink:1>", name, "svd", 0, api_name="/merge")
    assert not Path("/tmp/x.safetensors").exists()


# -- the page -----------------------------------------------------------------------------------------


def set_number(page, selector: str, value) -> None:
    box = page.locator(f"{selector} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def shown(page, selector: str) -> list[str]:
    return page.eval_on_selector_all(f"{selector} img", "els => els.map(e => e.src)")


def wait_new_image(page, selector: str, old: list[str]) -> np.ndarray:
    page.wait_for_function(
        "([sel, old]) => { const i = document.querySelector(sel + ' img'); return i && i.src && !old.includes(i.src); }",
        arg=[selector, old])
    return px(page.request.get(shown(page, selector)[0]).body())


def generate(page) -> np.ndarray:
    old = shown(page, "#gallery")
    page.click("#generate")
    return wait_new_image(page, "#gallery", old)


def open_section(page, title: str, selector: str) -> None:
    if not page.is_visible(selector):
        page.get_by_text(title, exact=True).click()
        page.wait_for_selector(selector)


def error_text(page, button: str, message: str) -> str:
    page.click(button)
    page.wait_for_function("m => (document.querySelector('#status .error') || {}).innerText?.includes(m)", arg=message)
    return page.inner_text("#status .error")


def reload(page, studio) -> None:
    """A fresh session (an empty stack) with every card of the folder shown."""
    page.reload(wait_until="domcontentloaded")
    page.wait_for_selector("#generate")
    for name in studio.available():
        page.get_by_role("button", name=f"+ {name}", exact=True).wait_for()


def ink_stack(page, studio) -> None:
    """The page with the stack [ink at 1] (each test sets it up itself: tests may run on another worker)."""
    if (page.locator("#slot-0-on").count() and "ink" in page.inner_text("#slot-0-on")
            and not page.locator("#slot-1").count() and page.input_value("#slot-0-weight input[type=number]") == "1"
            and page.input_value("#slot-0-te input") == "" and page.input_value("#slot-0-preset input") == "all"):
        return
    reload(page, studio)
    page.get_by_role("button", name="+ ink", exact=True).click()
    page.wait_for_selector("#slot-0-weight")
    page.wait_for_timeout(300)


def test_a_card_click_sent_before_a_re_render_adds_that_card(page, server):
    """A click the browser sent for "+ film" while the card list re-rendered (here: replayed after it) adds film.

    The list re-renders when the folder changes; a click already on its way was addressed to the handler of the
    previous render. It must still add the card that was clicked, not fail and not add a neighbour.
    """
    studio = server[1]
    reload(page, studio)
    sent: list[tuple[str, str]] = []
    page.on("request", lambda r: sent.append((r.url, r.post_data)) if "/queue/join" in r.url else None)
    page.get_by_role("button", name="+ film", exact=True).click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('added film')")
    url, click = sent[0]
    page.click("#slot-0-remove")
    page.wait_for_selector("#slot-0", state="detached")
    film = studio.adapter_dir / "film.safetensors"
    st = film.stat()
    os.utime(film, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # refresh unloads film: it changed
    (studio.adapter_dir / "aaa.safetensors").write_bytes((studio.adapter_dir / "grain.safetensors").read_bytes())
    page.click("#refresh")  # the list re-renders with a new first card
    page.get_by_role("button", name="+ aaa", exact=True).wait_for()
    assert "film" not in studio.loaded()
    reply = page.request.post(url, data=click, headers={"Content-Type": "application/json"})
    assert reply.ok, reply.text()
    for _ in range(100):
        if "film" in studio.loaded():
            break
        page.wait_for_timeout(100)
    assert "film" in studio.loaded() and "aaa" not in studio.loaded()
    (studio.adapter_dir / "aaa.safetensors").unlink()
    studio.refresh()
    reload(page, studio)


def test_a_generate_click_sent_before_the_stack_re_rendered_uses_the_stack_shown(page, server):
    """Generate pressed with the stack [ink at 0.4] and sent just as the stack became [film] (replayed after the
    re-render) makes the image of ink at 0.4: not an error, not film's. (A click whose stack had another number of
    slots is refused with a message: the values it carries cannot be matched to the new slots.)"""
    studio = server[1]
    reload(page, studio)
    set_number(page, "#seed", 0)
    page.get_by_role("button", name="+ ink", exact=True).click()
    page.wait_for_selector("#slot-0-weight")
    page.wait_for_timeout(300)
    set_number(page, "#slot-0-weight", 0.4)
    sent: list[tuple[str, str]] = []
    page.on("request", lambda r: sent.append((r.url, r.post_data)) if "/queue/join" in r.url else None)
    generate(page)
    url, click = sent[0]
    page.click("#slot-0-remove")
    page.wait_for_selector("#slot-0", state="detached")
    page.get_by_role("button", name="+ film", exact=True).click()
    page.wait_for_selector("#slot-0-weight")
    before = set(studio.output_dir.glob("*.png"))
    reply = page.request.post(url, data=click, headers={"Content-Type": "application/json"})
    assert reply.ok, reply.text()
    for _ in range(100):
        if new := set(studio.output_dir.glob("*.png")) - before:
            break
        page.wait_for_timeout(100)
    assert len(new) == 1
    path = new.pop()
    assert [(a.name, a.unet) for a in load_png(path).adapters] == [("ink", 0.4)]
    assert np.array_equal(px(Image.open(path)), direct(studio, slots={"ink": 0.4}))
    reload(page, studio)


def test_sliders_tags_and_off_in_the_browser(page, server):
    studio = server[1]
    set_number(page, "#seed", 0)
    page.get_by_role("button", name="+ ink", exact=True).click()
    page.wait_for_selector("#slot-0-weight")
    page.wait_for_timeout(300)  # the re-rendered stack's listeners are bound just after its components appear
    full = generate(page)
    assert read(page.input_value("#infotext textarea")).adapters[0].name == "ink"
    assert np.array_equal(full, direct(studio, slots={"ink": 1.0}))
    set_number(page, "#slot-0-weight", 0.3)
    moved = generate(page)
    assert not np.array_equal(moved, full)  # moving the slider changes the image…
    assert np.array_equal(moved, direct(studio, slots={"ink": 0.3}))  # …to exactly that weight
    set_number(page, "#slot-0-weight", 0)
    zero = generate(page)
    page.uncheck("#slot-0-on input")
    off = generate(page)
    assert np.array_equal(zero, off) and np.array_equal(off, direct(studio))
    page.fill("#prompt textarea", "a photo of a cat <lora:ink:0.3>")
    assert np.array_equal(generate(page), moved)  # the tag equals the slider
    info = read(page.input_value("#infotext textarea"))
    assert [(a.name, a.te, a.unet) for a in info.adapters] == [("ink", 0.3, 0.3)]
    page.fill("#prompt textarea", "a photo of a cat")
    page.check("#slot-0-on input")
    set_number(page, "#slot-0-weight", 1)
    set_number(page, "#slot-0-te", 0)
    assert np.array_equal(generate(page), direct(studio, slots={"ink": Slot(1.0, te=0.0)}))  # UNet only
    page.fill("#slot-0-te input", "")
    page.locator("#slot-0-te input").blur()
    page.click("#slot-0-preset input")
    assert [t.split("\n")[-1] for t in page.get_by_role("option").all_inner_texts()] == list(studio.presets)
    page.get_by_role("option", name="up only", exact=True).click()
    assert np.array_equal(generate(page), direct(studio, slots={"ink": Slot(1.0, preset="up only")}))
    assert "Lora block weights: ink=up only" in page.input_value("#infotext textarea")
    page.click("#slot-0-preset input")
    page.get_by_role("option", name="all", exact=True).click()


def test_compare_in_the_browser(page, server):
    studio = server[1]
    ink_stack(page, studio)
    open_section(page, "With / without", "#compare-out")
    page.click("#compare")
    page.wait_for_function("() => document.querySelectorAll('#compare-out img').length >= 2")
    with_, without = (px(page.request.get(src).body()) for src in shown(page, "#compare-out")[:2])
    assert np.array_equal(with_, direct(studio, slots={"ink": 1.0})) and np.array_equal(without, direct(studio))
    set_number(page, "#batch", 2)
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('seed 0…1')")
    assert len(set(shown(page, "#gallery"))) >= 2  # seeds 0 and 1
    set_number(page, "#batch", 1)


def test_upload_and_refresh_in_the_browser(page, server, tmp_path):
    studio = server[1]
    ink_stack(page, studio)
    upload = tmp_path / "ink.safetensors"  # the name of a loaded adapter: it gets a new one
    upload.write_bytes((studio.adapter_dir / "film.safetensors").read_bytes())
    ink = (studio.adapter_dir / "ink.safetensors").read_bytes()
    with page.expect_file_chooser() as chooser:
        page.click("#upload")
    chooser.value.set_files(str(upload))
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('added ink-1')")
    assert (studio.adapter_dir / "ink.safetensors").read_bytes() == ink
    page.get_by_role("button", name="+ ink-1", exact=True).wait_for()
    (studio.adapter_dir / "dropped.safetensors").write_bytes(ink)  # a file added behind the studio's back
    page.click("#refresh")
    page.get_by_role("button", name="+ dropped", exact=True).wait_for()
    page.click("#slot-1-remove")
    page.wait_for_selector("#slot-1", state="detached")


def test_grid_axes():
    from diffadapt.studio.app import grid_axes

    assert grid_axes("adapter × weight", ["ink", "film"], "0, 1", None, "") == (
        ["ink", "film"], ["0", "1"], [[{"ink": 0.0}, {"ink": 1.0}], [{"film": 0.0}, {"film": 1.0}]])
    assert grid_axes("weight × weight", ["ink"], "0.5", "film", "-1, 1") == (
        ["film -1", "film 1"], ["ink 0.5"], [[{"film": -1.0, "ink": 0.5}], [{"film": 1.0, "ink": 0.5}]])
    with pytest.raises(da.DiffAdaptError, match="X weights"):
        grid_axes("adapter × weight", ["ink"], "a, b", None, "")
    from diffadapt.studio.app import slots_from

    assert slots_from(["ink", "film"], (True, 0.5, None, "up only", False, 1, 2, "all")) == {
        "ink": Slot(0.5, None, "up only")}
    with pytest.raises(da.DiffAdaptError, match="stack changed"):  # values of a stack with another length
        slots_from(["ink"], (True, 0.5, None, "all", True, 1.0, None, "all"))


def test_grid_in_the_browser(page, server):
    ink_stack(page, server[1])
    open_section(page, "X/Y grid", "#grid-x textarea")
    # the accordion mounts its fields when opened: wait for the initial value before typing over it
    page.wait_for_function("() => document.querySelector('#grid-x textarea').value === '0, 0.5, 1'")
    page.fill("#grid-x textarea", "0, 1")
    page.press("#grid-x textarea", "Tab")
    old = shown(page, "#grid-out")
    page.click("#grid")
    grid = wait_new_image(page, "#grid-out", old)
    assert grid.shape[0] > SIZE and grid.shape[1] > 2 * SIZE  # one row (ink) × two weights, with labels
    assert "grid of 1 × 2" in page.inner_text("#status")


def test_merge_and_download(page, server):
    studio = server[1]
    ink_stack(page, studio)
    open_section(page, "Merge the stack into one LoRA", "#merge-name textarea")
    page.fill("#merge-name textarea", "browser-mix")
    page.click("#merge")
    link = page.wait_for_selector("#merge-file a[href]")
    status = page.inner_text("#status")
    error = float(status.rsplit("error", 1)[1])
    data = page.request.get(link.get_attribute("href")).body()
    assert data == (studio.adapter_dir / "browser-mix.safetensors").read_bytes()
    target = studio.adapter_dir.parent / "downloaded.safetensors"
    target.write_bytes(data)
    base, stack, merged = tiny_sd1_pipeline(), tiny_sd1_pipeline(), tiny_sd1_pipeline()
    da.load(stack, str(studio.adapter_dir / "ink.safetensors"))  # the page's stack: ink at 1
    da.load(merged, str(target))
    want = {k: v - base.unet.state_dict()[k] for k, v in stack.unet.state_dict().items()}
    got = {k: v - base.unet.state_dict()[k] for k, v in merged.unet.state_dict().items()}
    rel = (sum(float((got[k] - want[k]).norm() ** 2) for k in want) / sum(float(w.norm() ** 2) for w in want.values())) ** 0.5
    assert rel <= error * 1.01 + 1e-5


@pytest.mark.parametrize("field, value, button, message", [
    ("#merge-name textarea", "../../../evil", "#merge", "contains a path separator or '..'"),
    ("#merge-name textarea", "/tmp/evil", "#merge", "is an absolute path"),
    ("#prompt textarea", "a cat <lora:/etc/passwd:1>", "#generate", "'/etc/passwd' is an absolute path"),
    ("#prompt textarea", "a cat <lora:../../x:1>", "#generate", "'../../x' contains a path separator"),
    ("#prompt textarea", "a cat <lora: :1>", "#generate", "<lora: :1>: no network name"),  # escaped, not eaten
])
def test_attacks_and_errors_show_inline(page, server, field, value, button, message):
    open_section(page, "Merge the stack into one LoRA", "#merge-name textarea")
    page.fill(field, value)
    assert message in error_text(page, button, message)
    assert not any(Path(p).exists() for p in ("/tmp/evil.safetensors", server[1].adapter_dir.parent.parent / "evil.safetensors"))
    page.fill("#prompt textarea", "a photo of a cat")


def test_progress_and_cancel_in_the_browser(page, server):
    from diffadapt.pipeline import registry

    studio = server[1]
    ink_stack(page, studio)
    calls: list[int] = []
    hook = studio.pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        set_number(page, "#steps", 150)
        page.click("#generate")
        page.wait_for_function("() => document.body.innerText.includes('denoising')")  # per-step progress
        page.click("#cancel")
        page.wait_for_function("() => document.querySelector('#status').innerText.includes('Cancelled')")
        lock = registry(studio.pipe).lock
        assert lock.acquire(timeout=60)
        lock.release()
        assert 0 < len(calls) < 150  # stopped between steps, not run to the end
    finally:
        hook.remove()
        set_number(page, "#steps", STEPS)
    assert np.array_equal(generate(page), direct(studio, slots={"ink": 1.0}))
