"""The viewer: every API endpoint with a test client (bad input included), and an end-to-end test in
headless Chromium (Debian's chromium + chromium-driver, which .ci/run installs)."""
import io
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import captionlens as cl

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def captioner():
    cap = cl.build_captioner("gridtd", encoder="shapes", vocab="a red blue circle square".split(), hidden_size=12,
                             embed_size=8, seed=0)
    import torch

    with torch.no_grad():  # never <end>: captions of max_length words rather than empty ones
        cap.model.decoder.fc.bias[cap.vocab.end_id] = -1e4
    cap.config.max_length = 6
    return cap


@pytest.fixture(scope="module")
def client(captioner, tiny_shapes):
    from fastapi.testclient import TestClient

    from captionlens.viewer.app import create_app

    return TestClient(create_app(captioner, tiny_shapes, max_upload_bytes=200_000))


def png_bytes(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_page_methods_images_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and "captionlens viewer" in page.text and "textContent" in page.text
    methods = client.get("/api/methods").json()
    assert set(methods) == {"lrp", "gradcam", "guided_gradcam", "guided_backprop", "gradient_x_input", "attention"}
    assert methods["lrp"] == ["epsilon", "alpha", "beta", "first_layer", "attention_rule"]  # rollout: transformers only
    images = client.get("/api/images").json()
    assert len(images) == 10 and images[0]["id"].startswith("data-")
    picture = client.get(f"/api/images/{images[0]['id']}")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/caption", "/api/explain", "/api/methods", "/api/images", "/api/images/{image_id}"} <= set(paths)


def test_caption_and_explain_an_upload(client):
    result = client.post("/api/caption", files={"file": ("red.png", png_bytes(), "image/png")}).json()
    assert result["image_id"].startswith("upload-") and result["name"] == "red.png" and result["words"]
    again = client.post("/api/caption", data={"image_id": result["image_id"]}).json()
    assert again["words"] == result["words"]
    index = len(result["words"]) - 1
    explanation = client.post("/api/explain", json={"image_id": result["image_id"], "word_index": index,
                                                    "method": "lrp", "epsilon": 0.1}).json()
    assert explanation["heatmap_png"].startswith("data:image/png;base64,")
    assert [p["token"] for p in explanation["preceding"]] == ["<start>", *result["words"][:index]]
    assert explanation["parameters"]["epsilon"] == 0.1
    cached = client.post("/api/explain", json={"image_id": result["image_id"], "word_index": index, "method": "lrp",
                                               "epsilon": 0.1}).json()
    assert cached == explanation
    attention = client.post("/api/explain", json={"image_id": result["image_id"], "word_index": 0,
                                                  "method": "attention"}).json()
    assert "beta" in attention["extra"]
    assert attention["scale"]["kind"] == "sequential" and attention["scale"]["label"].startswith("0 … ")  # α ≥ 0
    assert explanation["scale"]["kind"] in ("diverging", "sequential", "zero") and explanation["scale"]["label"]


def test_a_transformer_in_the_viewer_rollout_and_attention_rules(client, tiny_shapes):
    import torch
    from fastapi.testclient import TestClient

    from captionlens.viewer.app import create_app

    cap = cl.build_captioner("transformer", encoder="shapes", vocab="a red blue circle square".split(), hidden_size=16,
                             embed_size=16, seed=0, architecture_options={"layers": 1, "heads": 2})
    with torch.no_grad():
        cap.model.decoder.fc.bias[cap.vocab.end_id] = -1e4
    cap.config.max_length = 4
    viewer = TestClient(create_app(cap, tiny_shapes))
    assert "rollout" in viewer.get("/api/methods").json()
    image_id = viewer.get("/api/images").json()[0]["id"]
    words = viewer.post("/api/caption", data={"image_id": image_id}).json()["words"]
    request = {"image_id": image_id, "word_index": len(words) - 1, "method": "lrp"}
    cp = viewer.post("/api/explain", json=request).json()
    attnlrp = viewer.post("/api/explain", json=request | {"attention_rule": "attnlrp"}).json()
    assert cp["parameters"]["attention_rule"] == "cp" and attnlrp["parameters"]["attention_rule"] == "attnlrp"
    assert "positions" in cp["extra"] and cp["preceding"] != attnlrp["preceding"]
    rollout = viewer.post("/api/explain", json=request | {"method": "rollout"}).json()
    assert rollout["scale"]["kind"] == "sequential"  # rollout is a non-negative map
    # the LSTM captioner has no rollout, and refuses AttnLRP's rules with a reason
    assert client.post("/api/explain", json={"image_id": image_id, "word_index": 0, "method": "rollout"}).status_code == 400
    client.post("/api/caption", data={"image_id": image_id})
    refused = client.post("/api/explain", json={"image_id": image_id, "word_index": 0, "attention_rule": "attnlrp"})
    assert refused.status_code == 400 and "additive" in refused.json()["detail"]


def test_bad_requests(client, tiny_shapes):
    big = client.post("/api/caption", files={"file": ("big.png", b"\0" * 300_000, "image/png")})
    assert big.status_code == 413
    text = client.post("/api/caption", files={"file": ("notes.png", b"just some text", "image/png")})
    assert text.status_code == 415 and "not an image" in text.json()["detail"]
    assert client.post("/api/caption", data={"image_id": "../../etc/passwd"}).status_code == 404
    assert client.get("/api/images/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert client.post("/api/caption").status_code == 422
    image_id = client.get("/api/images").json()[0]["id"]
    client.post("/api/caption", data={"image_id": image_id})
    unknown = client.post("/api/explain", json={"image_id": image_id, "word_index": 0, "method": "saliency"})
    assert unknown.status_code == 400 and "saliency" in unknown.json()["detail"]
    words = client.post("/api/caption", data={"image_id": image_id}).json()["words"]
    far = client.post("/api/explain", json={"image_id": image_id, "word_index": len(words)})
    assert far.status_code == 400 and "out of range" in far.json()["detail"]
    assert client.post("/api/explain", json={"image_id": image_id, "word_index": 99}).status_code == 422
    assert client.post("/api/explain", json={"image_id": "nope", "word_index": 0}).status_code == 404
    assert client.post("/api/explain", json={"image_id": image_id, "word_index": -1}).status_code == 422


def test_numbers_and_lengths_that_make_no_sense_are_4xx_never_500(client):
    image_id = client.get("/api/images").json()[0]["id"]
    client.post("/api/caption", data={"image_id": image_id})
    for body in ('{"image_id": "%s", "word_index": 0, "epsilon": NaN}', '{"image_id": "%s", "word_index": 0, "epsilon": 1e999}',
                 '{"image_id": "%s", "word_index": 0, "alpha": "x"}', '{"image_id": "%s", "word_index": 1e30}'):
        answer = client.post("/api/explain", content=body % image_id, headers={"content-type": "application/json"})
        assert answer.status_code == 422, body
    long = client.post("/api/explain", json={"image_id": image_id, "word_index": 0, "caption": ["a"] * 3000})
    assert long.status_code == 422
    assert client.post("/api/caption", data={"image_id": "x" * 5000}).status_code == 422


def test_uploads_are_bounded_in_pixels_count_and_rate(captioner, tmp_path):
    from fastapi.testclient import TestClient

    from captionlens.viewer.app import ViewerLimits, create_app

    limits = ViewerLimits(max_upload_pixels=100 * 100, max_uploads=3, requests_per_second=1000)
    client = TestClient(create_app(captioner, limits=limits, upload_dir=tmp_path / "uploads"))
    huge = client.post("/api/caption", files={"file": ("huge.png", png_bytes((200, 120)), "image/png")})
    assert huge.status_code == 413 and "megapixels" in huge.json()["detail"]
    ids = [client.post("/api/caption", files={"file": (f"{k}.png", png_bytes((40 + k, 30)), "image/png")}).json()["image_id"]
           for k in range(5)]
    kept = [i["id"] for i in client.get("/api/images").json()]
    assert kept == ids[2:] and len(list((tmp_path / "uploads").iterdir())) == 3  # the oldest two were evicted
    assert client.get(f"/api/images/{ids[0]}").status_code == 404
    picture = Image.open(io.BytesIO(client.get(f"/api/images/{ids[-1]}").content))
    assert picture.size == (44, 30)
    slow = TestClient(create_app(captioner, limits=ViewerLimits(requests_per_second=2)))
    codes = [slow.get("/api/methods").status_code for _ in range(8)]
    assert codes[:4] == [200] * 4 and 429 in codes  # a burst of 2 × rate, then 429


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(captioner, tiny_shapes):
    import uvicorn

    from captionlens.viewer.app import create_app
    from captionlens.viewer.server import guarded_protocol

    port = _free_port()  # the protocol `captionlens serve` runs, with a 1 s header deadline and 40 connections
    instance = uvicorn.Server(uvicorn.Config(create_app(captioner, tiny_shapes, max_upload_bytes=200_000),
                                             host="127.0.0.1", port=port, log_level="warning",
                                             http=guarded_protocol(header_timeout=1.0, max_connections=40)))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    for _ in range(100):
        if instance.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


def test_in_a_real_browser_upload_click_a_word_see_the_heatmap(server, tiny_shapes, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1100,800"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        browser.get(server)
        # an element the page replaces while a condition reads it (the word buttons, per image) is looked up again
        wait = WebDriverWait(browser, 30, ignored_exceptions=(StaleElementReferenceException,))
        image = sorted((tiny_shapes / "images").glob("*.png"))[0]
        browser.find_element(By.ID, "upload").send_keys(str(image))
        buttons = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#words button"))
        assert len(buttons) >= 2
        buttons[-1].click()
        wait.until(lambda b: (b.find_element(By.ID, "overlay").get_attribute("src") or "").startswith("data:image/png"))
        tokens = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#linguistic .tok"))
        assert [t.text for t in tokens][0] == "<start>" and len(tokens) == len(buttons)
        assert browser.find_element(By.ID, "download-png").is_displayed()
        tiles = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tiles figure") or None)
        labels = sorted(t.text for t in tiles)  # every method's heatmap of the word, titled, with its printed scale
        assert [label.split(" · ")[0] for label in labels] == ["Grad-CAM", "Guided Grad-CAM", "LRP", "attention",
                                                               "gradient×input", "guided backprop"]
        assert labels[3].startswith("attention · 0 … ")  # attention on the sequential scale
        wait.until(ready.text_to_be_present_in_element((By.ID, "score"), "LRP"))
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "viewer.png"))
        _the_page_shows_only_what_applies_and_resets_per_image(browser, wait, tmp_path)

        # a file name that is HTML is shown as text and never runs
        hostile = tmp_path / "<img src=x onerror=window.pwned=1>.png"
        hostile.write_bytes(image.read_bytes())
        browser.find_element(By.ID, "upload").send_keys(str(hostile))
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#words button"))
        browser.refresh()
        options = wait.until(lambda b: [o.text for o in b.find_elements(By.CSS_SELECTOR, "#dataset option")
                                        if "onerror" in o.text] or None)
        assert options == [hostile.name]
        assert browser.execute_script("return window.pwned === undefined")
        assert not browser.find_elements(By.CSS_SELECTOR, "#dataset img, body > img")
    finally:
        browser.quit()


def _the_page_shows_only_what_applies_and_resets_per_image(browser, wait, tmp_path) -> None:
    """Issue 27 in the browser: method titles and only the controls that apply; a busy indicator while
    a request is in flight; a caption of the user's own; the empty-caption notice; downloads at the
    photo's shape and as .npy, reset when another image is chosen."""
    import base64

    import numpy as np
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    shown = lambda parameter: browser.find_element(By.CSS_SELECTOR, f'[data-parameter="{parameter}"]').is_displayed()  # noqa: E731
    method = Select(browser.find_element(By.ID, "method"))
    assert [o.text for o in method.options] == ["attention", "Grad-CAM", "gradient×input", "guided backprop",
                                                "Guided Grad-CAM", "LRP"]
    assert shown("epsilon") and not shown("attention_rule")  # an LSTM: no dot-product attention rule
    method.select_by_value("attention")
    assert not shown("epsilon") and not shown("beta")
    method.select_by_value("lrp")
    wait.until(lambda b: b.find_element(By.ID, "busy").get_attribute("hidden") is not None)

    wide = tmp_path / "wide.png"
    Image.new("RGB", (120, 60), (30, 30, 200)).save(wide)
    browser.find_element(By.ID, "upload").send_keys(str(wide))
    wait.until(lambda b: not b.find_element(By.ID, "download-png").is_displayed())  # nothing of the last image
    assert not browser.find_element(By.ID, "overlay").get_attribute("src")
    assert browser.execute_script("return getComputedStyle(document.getElementById('overlay')).visibility") == "hidden"
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#words button"))
    browser.find_element(By.ID, "own-caption").send_keys("a blue square")
    browser.find_element(By.ID, "use-caption").click()
    wait.until(lambda b: [x.text for x in b.find_elements(By.CSS_SELECTOR, "#words button")] == ["a", "blue", "square"])
    browser.execute_script(  # every request from now on answers after 1.5 s: the indicator must show
        "const f = window.fetch; window.fetch = (...a) => new Promise(r => setTimeout(() => r(f(...a)), 1500));")
    browser.find_elements(By.CSS_SELECTOR, "#words button")[1].click()
    wait.until(lambda b: b.find_element(By.ID, "busy").is_displayed())
    wait.until(lambda b: (b.find_element(By.ID, "download-png").get_attribute("href") or "").startswith("data:"))
    wait.until(lambda b: not b.find_element(By.ID, "busy").is_displayed())
    png = browser.find_element(By.ID, "download-png").get_attribute("href").split(",", 1)[1]
    assert Image.open(io.BytesIO(base64.b64decode(png))).size == (120, 60)
    npy = browser.find_element(By.ID, "download-npy").get_attribute("href").split(",", 1)[1]
    assert np.load(io.BytesIO(base64.b64decode(npy))).shape == (64, 64)
    assert browser.find_element(By.ID, "download-npy").get_attribute("download") == "lrp_2_blue.npy"
    browser.save_screenshot(str(ARTIFACTS / "viewer_own_caption.png"))
    browser.execute_script("showCaption({image_id: current.imageId, words: [], unknown: []})")
    assert "caption of this image is empty" in browser.find_element(By.ID, "notice").text
    assert not browser.find_element(By.ID, "download-png").is_displayed()


# ------------------------------------------------------------------ hostile clients (issue 28)
def _raw(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _response(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return data


def test_an_oversized_json_body_is_refused_without_being_read(client):
    body = b'{"image_id": "' + b"x" * 200_000 + b'"}'
    declared = client.post("/api/explain", content=body, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "larger than" in declared.json()["detail"]
    streamed = client.post("/api/explain", content=iter([body[:50_000]] * 4),  # chunked: no Content-Length
                           headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    assert client.post("/api/explain", json={"image_id": "data-50", "word_index": 0}).status_code != 413


def test_a_chunked_upload_is_cut_off_while_it_streams(server):
    """An upload without Content-Length, far larger than the limit: the server answers 413 after reading
    about the limit, long before the client has sent it all (it is never spooled whole)."""
    sock = _raw(server)
    sock.sendall(b"POST /api/caption HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Type: multipart/form-data; boundary=B\r\n\r\n")
    piece = b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n" + b"\0" * 60_000
    sent = 0
    try:
        for _ in range(200):  # up to 12 MB; the limit is 200 kB (+ 64 kB of form)
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sent += len(piece)
            piece = b"\0" * 60_000
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = _response(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413") and sent < 12_000_000


def test_a_slow_header_client_is_disconnected_and_others_are_served(server):
    import httpx

    idle = [_raw(server) for _ in range(30)]
    for sock in idle:
        sock.sendall(b"GET /api/methods HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    began = time.perf_counter()
    assert httpx.get(f"{server}/api/methods", timeout=5).status_code == 200  # served meanwhile
    assert time.perf_counter() - began < 2
    time.sleep(1.5)  # past the 1 s header deadline
    for sock in idle:
        sock.settimeout(2)
        assert sock.recv(100) == b""  # closed by the server
        sock.close()


def test_connections_beyond_the_cap_are_closed_at_once(server):
    import httpx

    held = [_raw(server) for _ in range(45)]  # the cap is 40
    time.sleep(0.2)
    closed = 0
    for sock in held:
        sock.settimeout(0.5)
        try:
            closed += sock.recv(1) == b""
        except socket.timeout:
            pass
    for sock in held:
        sock.close()
    assert closed >= 5
    time.sleep(0.2)
    assert httpx.get(f"{server}/api/methods", timeout=5).status_code == 200


def test_errors_name_no_server_path_and_broken_uploads_are_not_kept(captioner, tmp_path):
    from fastapi.testclient import TestClient

    from captionlens.viewer.app import create_app

    uploads = tmp_path / "uploads"
    client = TestClient(create_app(captioner, upload_dir=uploads))
    assert not uploads.exists()  # made on the first upload, not before
    truncated = png_bytes((64, 64))[:60]  # a PNG header and size, then nothing
    answer = client.post("/api/caption", files={"file": ("cut.png", truncated, "image/png")})
    assert answer.status_code == 415 and str(uploads) not in answer.text and "/tmp" not in answer.text
    assert "cut.png" in answer.text
    assert client.get("/api/images").json() == []  # not listed
    assert not any(uploads.iterdir())


def test_the_upload_folder_goes_with_the_viewer(captioner):
    import gc

    from captionlens.viewer.app import ViewerLimits, ViewerState

    state = ViewerState(captioner, None, ViewerLimits())
    state.add_upload(png_bytes(), "a.png")
    folder = state.upload_dir
    assert folder.is_dir()
    del state
    gc.collect()
    assert not folder.exists()


def test_controls_own_captions_and_downloads_at_the_photos_shape(client, tiny_shapes):
    """The page's data: per method a readable title and only the parameters that apply (no attention
    rule for an LSTM, one for a transformer); a caption of the user's own, its unknown words named; the
    map at the photo's shape and as .npy."""
    import base64

    import numpy as np
    from fastapi.testclient import TestClient

    from captionlens.viewer.app import create_app

    controls = client.get("/api/controls").json()
    assert controls["gradient_x_input"]["title"] == "gradient×input" and controls["lrp"]["title"] == "LRP"
    assert controls["lrp"]["parameters"] == ["epsilon", "alpha", "beta", "first_layer"]  # additive attention only
    assert controls["attention"]["parameters"] == []
    transformer = cl.build_captioner("transformer", encoder="shapes", vocab="a red circle".split(), hidden_size=16,
                                     embed_size=16, seed=0, architecture_options={"layers": 1, "heads": 2})
    assert "attention_rule" in TestClient(create_app(transformer)).get("/api/controls").json()["lrp"]["parameters"]

    wide = client.post("/api/caption", files={"file": ("wide.png", png_bytes((120, 60)), "image/png")}).json()
    own = client.post("/api/caption", data={"image_id": wide["image_id"], "caption": "A blue Zebra!"}).json()
    assert own["words"] == ["a", "blue", "zebra"] and own["unknown"] == ["zebra"]
    assert client.post("/api/caption", data={"image_id": wide["image_id"], "caption": " ?! "}).status_code == 422
    tile = client.post("/api/explain", json={"image_id": wide["image_id"], "word_index": 1, "method": "lrp"}).json()
    assert tile["word"] == "blue" and tile["title"] == "LRP"  # the caption of the user's own is explained
    assert "heatmap_npy" not in tile and "heatmap_photo_png" not in tile  # downloads are made when asked for
    result = client.post("/api/explain", json={"image_id": wide["image_id"], "word_index": 1, "method": "lrp",
                                               "downloads": True}).json()
    assert {k: v for k, v in result.items() if not k.startswith("heatmap_")} == \
        {k: v for k, v in tile.items() if not k.startswith("heatmap_")}
    assert result["heatmap_png"] == tile["heatmap_png"]
    photo = Image.open(io.BytesIO(base64.b64decode(result["heatmap_photo_png"].split(",", 1)[1])))
    assert photo.size == (120, 60)  # the photo's shape, not the model's square
    array = np.load(io.BytesIO(base64.b64decode(result["heatmap_npy"].split(",", 1)[1])))
    assert array.shape == (64, 64) and array.dtype == np.float32
