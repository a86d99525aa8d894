"""The Gradio demo (demo/app.py) in a real browser: the app runs on 127.0.0.1 with a small random-weight SERA,
headless Chromium (driven by Selenium) uploads an image, types expressions and presses Segment, and the masks the page
shows are those `pipeline(...)` gives for the same input. A screenshot of the page is saved.

Needs gradio and selenium (`pip install -e ".[demo]" selenium`) and Debian's chromium + chromium-driver (`.ci/run`
installs all of them); skipped, saying which is missing, without them."""

import importlib.util
import io
import os
import shutil
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from modeling_sera import SeraConfig, SeraForReferringSegmentation, SeraProcessor
from tests.helpers import REPO_ROOT, TINY_HUB_CONFIG


gradio = pytest.importorskip("gradio", reason="gradio is not installed: pip install -e '.[demo]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install selenium")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "headless Chromium is not installed: apt-get install -y chromium chromium-driver", allow_module_level=True
    )

from selenium.webdriver.common.by import By  # noqa: E402  (after the skips: selenium may be absent)
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


EXPRESSIONS = ["the red circle", "the blue square on the right"]
# Where to copy the screenshot as well (the README's picture): SERA_DEMO_SCREENSHOT=docs/demo_screenshot.png.
SCREENSHOT_COPY = os.environ.get("SERA_DEMO_SCREENSHOT")


def load_app():
    spec = importlib.util.spec_from_file_location("sera_demo_app", REPO_ROOT / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A random-weight tiny SERA whose processor's threshold makes the first expression's mask on the test scene
    cover about half of it, so that the masks the test compares are neither empty nor full."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("demo") / "sera-tiny"
    model = SeraForReferringSegmentation(SeraConfig.from_pretrained(TINY_HUB_CONFIG)).eval()
    processor = SeraProcessor.from_pretrained(TINY_HUB_CONFIG)
    inputs = processor(images=[scene()], text=EXPRESSIONS[:1], return_tensors="pt")
    with torch.no_grad():
        logits = model(**{name: inputs[name] for name in ("pixel_values", "input_ids", "attention_mask")}).logits
    low, high = 0.0, 1.0
    for _ in range(20):  # bisect for the threshold at which the mask covers half the image
        middle = (low + high) / 2
        mask = processor.post_process_referring_segmentation(logits, inputs["original_sizes"], threshold=middle)[0]
        low, high = (middle, high) if mask["mask"].float().mean() > 0.5 else (low, middle)
    processor.mask_threshold = round(low, 6)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(model_folder):
    """The app, as `SERA_MODEL=folder python demo/app.py` builds it, served on 127.0.0.1."""
    app = load_app()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SERA_MODEL", str(model_folder))
        model = app.resolve_model()
    segmenter = app.load_segmenter(model)
    demo = app.build_demo(segmenter, model)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    yield app, demo, url.rstrip("/") + "/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def scene(width: int = 120, height: int = 80) -> Image.Image:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(150, 230, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 25, 50, 65), fill=(220, 30, 30))
    draw.rectangle((70, 15, 110, 55), fill=(30, 60, 220))
    return image


def fetch_image(source: str) -> Image.Image:
    with urllib.request.urlopen(source, timeout=30) as response:
        return Image.open(io.BytesIO(response.read()))


def test_upload_type_submit_and_the_masks_match_the_pipeline(served, browser, model_folder, tmp_path):
    from transformers import pipeline

    _, _, url = served
    image_path = tmp_path / "scene.png"
    scene().save(image_path)

    browser.get(url)
    wait = WebDriverWait(browser, 120)
    upload = wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, "#input-image input[type=file]"))
    upload.send_keys(str(image_path))
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#input-image img"))
    textbox = browser.find_element(By.CSS_SELECTOR, "#expressions textarea")
    textbox.send_keys("\n".join(EXPRESSIONS))
    wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#segment"))).click()

    thumbnails = wait.until(
        lambda driver: (found := driver.find_elements(By.CSS_SELECTOR, "#masks img")) and len(found) >= 2 and found
    )
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#overlay img"))
    wait.until(lambda driver: EXPRESSIONS[1] in driver.find_element(By.CSS_SELECTOR, "#routing").text)
    time.sleep(0.5)  # let the images finish painting for the screenshot
    screenshot = tmp_path / "demo_screenshot.png"
    assert browser.save_screenshot(str(screenshot))
    if SCREENSHOT_COPY:
        shutil.copy(screenshot, REPO_ROOT / SCREENSHOT_COPY)

    reference = pipeline("referring-image-segmentation", model=str(model_folder), trust_remote_code=True, device="cpu")
    expected = reference(Image.open(image_path), EXPRESSIONS, return_router_weights=True)
    shown = [fetch_image(thumbnail.get_attribute("src")) for thumbnail in thumbnails[: len(EXPRESSIONS)]]
    assert 0 < np.mean(np.asarray(expected[0]["mask"]) > 0) < 1  # a comparison that can fail
    for mask, result in zip(shown, expected):
        assert mask.size == (120, 80)
        np.testing.assert_array_equal(np.asarray(mask.convert("L")) > 0, np.asarray(result["mask"]) > 0)

    # The table: one row per expression with its score and both stages' routing weights.
    table = browser.find_element(By.CSS_SELECTOR, "#routing").text
    for expression, result in zip(EXPRESSIONS, expected):
        assert expression in table and f"{round(result['score'], 4)}" in table
        fusion = result["router_weights"]["fusion"]
        assert f"{round(fusion['spatial'], 3)}" in table
    assert "fusion spatial" in table and "adapter boundary" in table
    assert Image.open(screenshot).size[0] >= 1000


def test_the_model_comes_from_the_environment_or_the_default_run(monkeypatch, tmp_path):
    app = load_app()
    monkeypatch.setenv("SERA_MODEL", "org/sera-refcoco")
    assert app.resolve_model() == "org/sera-refcoco"
    monkeypatch.delenv("SERA_MODEL")
    monkeypatch.chdir(tmp_path)
    (tmp_path / app.DEFAULT_MODEL).mkdir(parents=True)
    (tmp_path / app.DEFAULT_MODEL / "config.json").write_text("{}")
    assert app.resolve_model() == app.DEFAULT_MODEL
    if not (REPO_ROOT / app.DEFAULT_MODEL / "config.json").is_file():
        (tmp_path / app.DEFAULT_MODEL / "config.json").unlink()
        with pytest.raises(SystemExit, match="no model. Set SERA_MODEL"):
            app.resolve_model()
    with pytest.raises(gradio.Error, match="Type an expression"):
        app.parse_expressions(" \n ")


def test_gradio_is_an_optional_extra_whose_range_holds_the_tested_version_pinned_in_the_constraints():
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (requirement,) = [Requirement(entry) for entry in extras["demo"]]
    assert requirement.name == "gradio" and requirement.specifier.contains(gradio.__version__)
    constraints = (REPO_ROOT / "constraints.txt").read_text().splitlines()
    assert f"gradio=={gradio.__version__}" in constraints
    front_matter = (REPO_ROOT / "demo" / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in front_matter and f"sdk_version: {gradio.__version__}" in front_matter
    assert "app_file: app.py" in front_matter
