"""The sampling server (launch/serve.py): the JSON API and its errors, batching of concurrent requests,
503 when the queue is full, the access token, and the page driven in headless Chromium as a person
would use it (type a caption, press the button, see the images)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from dalle_repro.core.distributed import free_port  # noqa: E402
from dalle_repro.data.tokenizer import TextTokenizer  # noqa: E402
from dalle_repro.models.dvae import DVAE, DVAEArgs  # noqa: E402
from dalle_repro.models.transformer import Transformer, TransformerArgs  # noqa: E402
from dalle_repro.sample.export import load_prior, write_export  # noqa: E402
from dalle_repro.sample.rerank import Reranker  # noqa: E402
from dalle_repro.serve.app import create_app  # noqa: E402
from dalle_repro.serve.batcher import Batcher  # noqa: E402


@pytest.fixture(scope="module")
def export(tokenizer_path: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    tok = TextTokenizer(tokenizer_path, 8)
    args = TransformerArgs(
        dim=32, depth=4, heads=4, text_len=8, text_vocab=tok.vocab_size, grid=4, image_vocab=32, conv_kernel=3
    )
    model = Transformer(args).eval()
    dvae = DVAE(DVAEArgs(image_size=16, n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=8))
    dvae.save_pretrained(root / "dvae")
    state = model.state_dict()
    cfg = {"model": args, "precision": {"dtype": "fp32"}}
    write_export(root / "export", cfg, state, state, tokenizer_path, root / "dvae", {"step": 1, "caption_dropout": 0.1})
    return root / "export"


class Server:
    """The app on a free loopback port, in a thread (as launch/serve.py runs it)."""

    def __init__(self, export: Path, clip_dir: Path | None, token: str | None = None, **batching):
        self.prior = load_prior(export)
        self.batcher = Batcher(self.prior, Reranker(clip_dir) if clip_dir else None, **batching)
        app = create_app(
            self.batcher, {"model": str(export), "clip": str(clip_dir), "grid": 4, "image_size": 16}, token
        )
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def post(self, body: dict, headers: dict | None = None) -> tuple[int, dict, dict]:
        req = urllib.request.Request(
            self.url + "/api/generate",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), dict(e.headers)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.batcher.close()


@pytest.fixture(scope="module")
def server(export, clip_dir):
    s = Server(export, clip_dir, max_wait=0.3)
    yield s
    s.stop()


def png_b64(size: tuple[int, int] = (16, 16)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_the_api_returns_reranked_images_and_every_candidate_on_request(server):
    code, body, _ = server.post({"caption": "red heart", "candidates": 6, "keep": 3, "grid": True, "seed": 2})
    assert code == 200, body
    assert body["caption"] == "red heart" and len(body["images"]) == 3 and len(body["candidates"]) == 6
    scores = [im["score"] for im in body["images"]]
    assert scores == sorted(scores, reverse=True)
    from PIL import Image

    im = Image.open(io.BytesIO(base64.b64decode(body["images"][0]["png"])))
    assert im.size == (16, 16)
    again = server.post({"caption": "red heart", "candidates": 6, "keep": 3, "grid": True, "seed": 2})[1]
    assert [c["png"] for c in again["candidates"]] == [c["png"] for c in body["candidates"]]  # seeds reproduce


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"caption": ""}, "caption"),
        ({"caption": "   "}, "caption"),
        ({"caption": "x" * 10_000}, "caption"),
        ({"caption": "a", "candidates": 0}, "candidates"),
        ({"caption": "a", "candidates": 2, "keep": 3}, "keep"),
        ({"caption": "a", "temperature": -1}, "temperature"),
        ({"caption": "a", "top_k": 1000}, "top_k"),
        ({"caption": "a", "top_p": 2}, "top_p"),
        ({"caption": "a", "init_rows": 2}, "init_image"),
        ({"caption": "a", "init_image": "bm90IGFuIGltYWdl", "init_rows": 1}, "init_image"),
        ({"caption": "a", "init_image": png_b64()}, "init_image"),
        ({"caption": "a", "init_image": png_b64(), "edit_box": [0, 0, 40, 8]}, "edit_box"),
        ({"caption": "a", "init_image": png_b64((16, 8)), "edit_box": [0, 0, 8, 8]}, "init_image"),
        ({"caption": "a", "init_image": png_b64(), "init_rows": 9}, "init_rows"),
    ],
)
def test_bad_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(server, body, field):
    code, answer, _ = server.post(body)
    assert 400 <= code < 500 and field in answer["error"], answer
    assert server.post({"caption": "rocket", "candidates": 2, "keep": 1})[0] == 200


def test_edits_through_the_api(server):
    code, body, _ = server.post(
        {"caption": "rocket", "candidates": 4, "keep": 2, "init_image": png_b64((32, 32)), "edit_box": [8, 8, 24, 16]}
    )
    assert code == 200 and len(body["images"]) == 2, body
    code, body, _ = server.post(
        {"caption": "rocket", "candidates": 4, "keep": 2, "init_image": png_b64(), "init_rows": 2}
    )
    assert code == 200 and len(body["images"]) == 2, body


def test_concurrent_requests_are_served_by_one_generate_call(server):
    before = dict(server.batcher.stats)
    captions = ["red heart", "rocket", "dog face", "grinning face", "sun", "moon"]
    with ThreadPoolExecutor(len(captions)) as pool:
        answers = list(pool.map(lambda c: server.post({"caption": c, "candidates": 4, "keep": 2}), captions))
    assert all(code == 200 for code, _, _ in answers)
    after = server.batcher.stats
    calls, served = after["generate_calls"] - before["generate_calls"], after["requests"] - before["requests"]
    assert served == len(captions) and calls < served  # several requests shared a call
    assert max(body["batched_with"] for _, body, _ in answers) > 1
    assert [body["caption"] for _, body, _ in answers] == captions  # each got its own answer


def test_a_full_queue_answers_503_with_a_retry_hint(export):
    s = Server(export, None, queue_size=1, max_wait=0.0)
    gate = threading.Event()
    run = s.batcher._run

    def held(batch):
        gate.wait(30)
        run(batch)

    s.batcher._run = held
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(s.post, {"caption": "a", "candidates": 2, "keep": 1})
            time.sleep(0.5)  # the worker holds the first
            second = pool.submit(s.post, {"caption": "b", "candidates": 2, "keep": 1})
            time.sleep(0.3)  # the second waits in the queue (size 1)
            code, body, headers = s.post({"caption": "c", "candidates": 2, "keep": 1})
            assert code == 503 and "busy" in body["error"] and int(headers["retry-after"]) >= 1
            gate.set()
            assert first.result()[0] == 200 and second.result()[0] == 200
        assert s.batcher.stats["busy"] == 1
    finally:
        gate.set()
        s.stop()


def test_a_token_is_needed_when_set(export):
    s = Server(export, None, token="s3cret-token")
    try:
        assert s.get("/api/info")[0] == 401
        assert s.post({"caption": "a", "candidates": 2, "keep": 1})[0] == 401
        auth = {"Authorization": "Bearer s3cret-token"}
        assert s.get("/api/info", auth)[0] == 200
        assert s.post({"caption": "a", "candidates": 2, "keep": 1}, auth)[0] == 200
        with urllib.request.urlopen(s.url + "/", timeout=10) as r:  # the page itself loads; it sends the token
            assert r.status == 200 and b"Authorization" in r.read()
    finally:
        s.stop()


def test_serve_cli_warns_for_another_address_and_refuses_a_bad_model(tmp_path, capsys):
    from dalle_repro.cli.serve import main

    assert main(["--model", str(tmp_path / "nope"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "reachable from other machines" in err and "--token" in err and "nope" in err


def chrome():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("headless Chromium is not installed (bash tools/setup.sh --dev installs chromium and its driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_the_page_in_headless_chromium_shows_images_for_a_typed_caption(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chrome()
    try:
        browser.get(server.url + "/")
        caption = "<b>red</b> heart & rocket"  # shown as text, never as HTML
        box = browser.find_element(By.ID, "caption")
        box.send_keys(caption)
        browser.find_element(By.ID, "candidates").clear()
        browser.find_element(By.ID, "candidates").send_keys("4")
        browser.find_element(By.ID, "keep").clear()
        browser.find_element(By.ID, "keep").send_keys("2")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results .kept img"))
        images = browser.find_elements(By.CSS_SELECTOR, "#results .kept img")
        assert len(images) == 2
        assert all(browser.execute_script("return arguments[0].naturalWidth", im) == 16 for im in images)
        assert browser.find_element(By.CSS_SELECTOR, "#results h3").text == caption
        assert not browser.find_elements(By.CSS_SELECTOR, "#results b, #history b")
        assert browser.find_element(By.CSS_SELECTOR, "#history li").text == caption
        # an error is shown, not thrown: an empty caption
        box.clear()
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 30).until(lambda b: "error" in b.find_element(By.ID, "status").text)
        assert "caption" in browser.find_element(By.ID, "status").text
    finally:
        browser.quit()
