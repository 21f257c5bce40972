"""Both HTML reports (`pase plan --html`, `pase whatif --html`) as a person sees them: headless Chromium opens the
file, every image must load (the page records it on <body>), and its screenshot must not be blank. The picture
itself (`pase plan --png`) is checked too: a U of blocks, skip connections, a pipeline's schedule."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: tools/setup.sh installs Debian's package")
TINY_GPU = ('{"gpu": {"id": "Tiny", "bf16_tflops": 10, "fp32_tflops": 5, "memory_gb": 0.010, "memory_bw_gbps": 100},'
            ' "gpus_per_node": 2}')


def _pase(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pase", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={"COLUMNS": "200", **__import__("os").environ})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)


def _seen(page: Path, tmp_path: Path) -> np.ndarray:
    """The page's DOM after load says every image loaded; returns its screenshot as greyscale pixels."""
    dom = _chromium("--dump-dom", page.as_uri())
    assert 'data-images-loaded="yes"' in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / f"{page.stem}-screenshot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1400,1100", page.as_uri())
    assert shot.exists(), f"chromium wrote no screenshot of {page}"
    return np.asarray(Image.open(shot).convert("L"), dtype=np.float64)


def _not_blank(pixels: np.ndarray) -> None:
    inked = (pixels < 200).mean()  # text, table rules, bars: a blank or failed page is nearly all white
    assert inked > 0.02 and pixels.std() > 20, (inked, pixels.std())


@pytest.mark.slow  # 14 s; the plan picture (with a pipeline schedule) opens in the browser in the default suite
@needs_browser
@pytest.mark.timeout(400)
def test_the_plan_and_what_if_reports_render_in_a_browser(tmp_path) -> None:
    (tmp_path / "tiny-gpu.json").write_text(TINY_GPU)
    _pase("plan", "--model", "unet-tiny", "--cluster", "tiny-gpu.json", "--batch", "2", "--html", "plan.html",
          "--png", "plan.png", cwd=tmp_path)
    _pase("whatif", "--model", "unet-tiny", "--batch", "8", "--clusters", "2xH100-SXM,2xA100-80GB-SXM",
          "--html", "whatif.html", cwd=tmp_path)
    for page in ("plan.html", "whatif.html"):
        _not_blank(_seen(tmp_path / page, tmp_path))


def test_the_plan_picture_shows_the_u_the_choices_and_a_pipeline_schedule(tmp_path) -> None:
    from pase.graph import extract_model
    from pase.planning.plan_report import block_rows, schedule_timeline

    (tmp_path / "tiny-gpu.json").write_text(TINY_GPU)
    _pase("plan", "--model", "unet-tiny", "--cluster", "tiny-gpu.json", "--batch", "2", "--png", "plan.png",
          "--json", "plan.json", cwd=tmp_path)
    _not_blank(np.asarray(Image.open(tmp_path / "plan.png").convert("L"), dtype=np.float64))
    from pase.planning.plan import Plan

    plan = Plan.load(tmp_path / "plan.json")
    rows = block_rows(plan, extract_model("unet-tiny", 2, use_cache=True), None)
    depth = {r["block"]: r["depth"] for r in rows}
    assert depth["conv_in"] == depth["conv_out"] == 0 < depth["down_blocks.1.resnets.0"] < depth["mid_block.resnets.0"]
    assert depth["up_blocks.0.resnets.0"] == depth["down_blocks.1.resnets.0"]  # the U climbs back
    assert {r["block"] for r in rows if r["recompute"]} == set(plan.options["checkpoint_blocks"])
    # 1F1B on 3 stages, 4 microbatches: every pass once, a stage never runs two at once, and the backward of a
    # microbatch waits for the next stage's
    timeline = schedule_timeline([3.0, 3.0, 3.0], 4, "1f1b")
    for passes in timeline:
        assert sorted((kind, i) for _, _, kind, i in passes) == sorted((k, i) for k in "FB" for i in range(4))
        ends = [start + length for start, length, _, _ in passes]
        assert all(passes[j + 1][0] >= ends[j] - 1e-12 for j in range(len(passes) - 1))
    finish = {(s, kind, i): start + length for s, passes in enumerate(timeline) for start, length, kind, i in passes}
    start_of = {(s, kind, i): start for s, passes in enumerate(timeline) for start, _, kind, i in passes}
    assert all(start_of[0, "B", i] >= finish[1, "B", i] for i in range(4))
    gpipe = schedule_timeline([3.0, 3.0], 4, "gpipe")
    assert [kind for _, _, kind, _ in gpipe[0]] == ["F"] * 4 + ["B"] * 4
