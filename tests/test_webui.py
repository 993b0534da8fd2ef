"""LLaMA-Board end to end in a real browser.

LLaMA-Board end to end in a real browser: the real ``llamafactory-cli webui`` on loopback, driven by Playwright
in headless Chromium (Debian's ``chromium``; ``scripts/test.sh`` installs it). Screenshots: the MinorSFT
controls in ``test-artifacts/webui_stage_controls.png``, the finished run in ``test-artifacts/webui_minorsft.png``.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import VENV_BIN, cli_env
from llamafactory_minorsft.webui import LOCALES


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
MODEL_NAME = "Qwen2-0.5B-Instruct"  # any listed name; the path below points it at the tiny model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def webui(tmp_path):
    """The stock web UI server, started from a temporary directory (it writes saves/ and caches there)."""
    port = free_port()
    env = cli_env(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False")
    log = open(tmp_path / "webui.log", "w")
    server = subprocess.Popen(
        [str(VENV_BIN / "llamafactory-cli"), "webui"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise AssertionError((tmp_path / "webui.log").read_text()[-3000:])
            time.sleep(1)
    yield url, tmp_path
    server.terminate()
    server.wait(timeout=30)
    log.close()


def pick(page, label: str, value: str) -> None:
    """Choose ``value`` in the visible dropdown labelled ``label`` (typed in when it is a custom value)."""
    box = page.get_by_label(label, exact=True).filter(visible=True)
    box.click()
    box.fill(value)
    option = page.get_by_role("option", name=value, exact=True).filter(visible=True)
    if option.count():
        option.first.click()
    else:
        box.press("Enter")
    page.wait_for_timeout(300)


def open_accordion(page, title: str) -> None:
    page.get_by_text(title).filter(visible=True).first.click()
    page.wait_for_timeout(300)


def choose_dataset(page, name: str) -> list[str]:
    """Pick ``name`` in the dataset dropdown, which lists the current stage's data sets; returns the list."""
    page.get_by_role("textbox", name=re.compile(r"^Data dir")).focus()
    page.keyboard.press("Tab")  # focusing the dropdown lists the data sets
    option = page.get_by_role("option", name=name, exact=True).filter(visible=True)
    option.wait_for(timeout=10_000)
    listed = page.get_by_role("option").filter(visible=True).all_inner_texts()
    option.click()
    page.wait_for_timeout(300)
    return listed


def top(page, text: str) -> float:
    """The page y of the visible element showing ``text``."""
    return page.get_by_text(text, exact=True).filter(visible=True).first.bounding_box()["y"]


def shown(page, text: str) -> bool:
    return page.get_by_text(text, exact=True).filter(visible=True).count() > 0


def preview(page) -> str:
    page.get_by_role("button", name="Preview command").click()
    page.wait_for_timeout(1500)
    return page.locator("code").filter(visible=True).first.inner_text()


@pytest.mark.compat
def test_minorsft_from_the_web_ui(webui, tiny):
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), (
        "Debian's chromium is missing: scripts/test.sh installs it (apt-get install chromium)"
    )
    url, workdir = webui
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        try:
            drive_the_ui(page, url, tiny, workdir)
        finally:  # the page's last state: an artifact, and the first thing to look at when this test fails
            page.screenshot(path=str(ARTIFACTS / "webui_last.png"), full_page=True)
            browser.close()

    from llamafactory.extras.env import VERSION

    out = workdir / "saves" / MODEL_NAME / "lora" / "ui_minorsft"
    args = yaml.safe_load((out / "training_args.yaml").read_text())
    assert args["stage"] == "minorsft" and args["pref_beta"] == 0.2
    assert args.get("neat_packing", False) == (VERSION != "0.9.4")
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(steps) == 24 and all("deviation" in entry and "coef" in entry for entry in steps)
    assert (out / "training_deviation.png").exists() and (out / "trainer_deviation.jsonl").exists()


def drive_the_ui(page, url: str, tiny, workdir: Path) -> None:
    from llamafactory.extras.env import VERSION
    from llamafactory.webui.locales import LOCALES as LF_LOCALES

    packs = VERSION != "0.9.4"

    page.goto(url, wait_until="domcontentloaded")
    page.get_by_label("Stage", exact=True).wait_for(timeout=120_000)

    # the two stages and the reference controls, in every language LLaMA-Board ships
    for lang in ("ru", "zh", "ko", "ja", "en"):
        language = page.get_by_role("listbox").filter(visible=True).first  # the first control of the page
        language.click()
        page.get_by_role("option", name=lang, exact=True).filter(visible=True).click()
        page.get_by_text(LOCALES["ref_tab"][lang]["label"]).filter(visible=True).wait_for(timeout=10_000)
        page.get_by_label(LF_LOCALES["training_stage"][lang]["label"], exact=True).filter(visible=True).click()
        options = page.get_by_role("option").filter(visible=True).all_inner_texts()
        assert {"MinorSFT", "SFT using DPO", "SFT-GO", "DPO"} <= set(options), (lang, options)
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)

    # the model: LLaMA-Board's own controls, pointed at the tiny offline model
    pick(page, "Model name", MODEL_NAME)
    page.get_by_role("textbox", name=re.compile(r"^Model path")).fill(tiny.model)
    pick(page, "Chat template", "qwen")

    # the new accordions sit with the RLHF configurations, above the Start button; each stage shows what it uses
    ref_tab, go_tab = LOCALES["ref_tab"]["en"]["label"], LOCALES["sft_go_tab"]["en"]["label"]
    stock_rlhf = [LF_LOCALES[name]["en"]["label"] for name in ("pref_loss", "pref_ftx", "reward_model")]
    open_accordion(page, "RLHF configurations")
    pick(page, "Stage", "DPO")
    assert all(shown(page, label) for label in stock_rlhf) and not shown(page, ref_tab) and not shown(page, go_tab)
    pick(page, "Stage", "SFT-GO")
    assert shown(page, ref_tab) and shown(page, go_tab) and not any(shown(page, label) for label in stock_rlhf)
    assert top(page, "RLHF configurations") < top(page, ref_tab) < top(page, go_tab) < top(page, "Start")
    pick(page, "Stage", "MinorSFT")
    assert shown(page, ref_tab) and not shown(page, go_tab) and not any(shown(page, label) for label in stock_rlhf)
    open_accordion(page, ref_tab)
    assert not shown(page, "Track deviation")  # minorsft always logs the deviation
    page.screenshot(path=str(ARTIFACTS / "webui_stage_controls.png"), full_page=True)
    data_dir = page.get_by_role("textbox", name=re.compile(r"^Data dir"))
    data_dir.fill(tiny.data)
    datasets = choose_dataset(page, "minorsft_demo")
    assert "minorsft_demo" in datasets and "pairs" not in datasets  # `pairs` is a ranking data set
    pick(page, "Compute type", "fp32")
    open_accordion(page, "Extra configurations")
    page.get_by_role("textbox", name=re.compile(r"^Extra arguments")).fill(
        json.dumps(
            {
                "max_steps": 24,
                "logging_steps": 1,
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "report_to": "none",
                "dataloader_num_workers": 0,
                "preprocessing_num_workers": 1,
                "save_steps": 1000,
            }
        )
    )
    if packs:  # LLaMA-Board's own packing control (0.9.4 refuses neat packing with its transformers)
        page.get_by_label(LF_LOCALES["neat_packing"]["en"]["label"]).filter(visible=True).check()
    beta = page.get_by_label("number input for Beta value")
    beta.fill("0.2")
    beta.press("Enter")
    pick(page, "Output dir", "ui_minorsft")
    pick(page, "Config path", "ui_minorsft.yaml")

    command = preview(page)
    assert "--stage minorsft" in command and "--pref_beta 0.2" in command and "--finetuning_type lora" in command
    assert "--track_deviation" not in command and "--ref_model" not in command
    assert ("--neat_packing True" in command) == packs

    # Save arguments / Load arguments round-trip the stage and β
    page.get_by_role("button", name="Save arguments").click()
    page.wait_for_timeout(1500)
    saved = yaml.safe_load((workdir / "llamaboard_config" / "ui_minorsft.yaml").read_text())
    assert saved["train.training_stage"] == "MinorSFT" and saved["train.pref_beta"] == 0.2
    beta.fill("0.7")
    beta.press("Enter")
    page.get_by_role("button", name="Load arguments").click()
    page.wait_for_timeout(1500)
    assert beta.input_value() == "0.2"

    # Start: the same training as the CLI, with the live loss and deviation plot
    page.get_by_role("button", name="Start").click()
    page.get_by_text("Finished.").filter(visible=True).first.wait_for(timeout=300_000)
    page.wait_for_timeout(1000)
    page.get_by_text("RLHF configurations").filter(visible=True).first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "webui_minorsft.png"))  # β, the buttons, the loss + deviation plot

    # plain SFT: stock arguments unless track_deviation is ticked
    pick(page, "Stage", "Supervised Fine-Tuning")  # LLaMA-Board clears the dataset on a stage change
    choose_dataset(page, "minorsft_demo")
    command = preview(page)
    assert "--stage sft" in command and "--pref_beta" not in command and "--track_deviation" not in command
    page.get_by_label("Track deviation").filter(visible=True).check()
    command = preview(page)
    assert "--track_deviation True" in command and "--pref_beta 0.2" in command
    page.get_by_label("Track deviation").filter(visible=True).uncheck()

    # SFT-GO: its own accordion; Rho-1 grouping brings the reference arguments along
    pick(page, "Stage", "SFT-GO")
    choose_dataset(page, "minorsft_demo")
    open_accordion(page, LOCALES["sft_go_tab"]["en"]["label"])
    command = preview(page)
    assert "--stage sft_go" in command and "--sft_go_grouping tfidf" in command and "--pref_beta" not in command
    assert "--sft_go_lambda 0.9" in command and "--sft_go_lambda_schedule linear" in command  # the paper's defaults
    assert "--sft_go_group_reduction batch" in command
    pick(page, "Token grouping", "rho1")
    pick(page, "λ schedule", "cosine")
    pick(page, "Group losses", "sample")
    command = preview(page)
    assert "--sft_go_grouping rho1" in command and "--sft_go_eta 0.5" in command and "--sft_go_lambda 0.9" in command
    assert "--sft_go_lambda_schedule cosine" in command and "--sft_go_group_reduction sample" in command
    assert "--pref_beta 0.2" in command
    assert "--sft_go_classifier" not in command and "--track_deviation" not in command
