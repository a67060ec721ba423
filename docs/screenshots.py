"""Remake the screenshots of the site and the README from the phantom: `python docs/screenshots.py` (about 6 minutes on
a 2-core CPU), or `python docs/screenshots.py outputs/<date>/<time>` to take a default run that is already trained.

It trains the default run on the built-in phantom (the report of its test stage), predicts a freshly written phantom
folder with it (predict.py's report), opens both pages in headless Chromium and writes the top of each, scaled
down, to docs/images/. Needs the `chromium` package; everything else comes with `pip install -e .`.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WIDTH_PX = 1000  # of the PNG written: legible on the site, a few hundred kB at most
TRAIN = ["callbacks.progress_bar=null"]  # the default run of the quick start, as the pages describe it


def run(*command: str, cwd: Path = ROOT) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=cwd, check=True)


def screenshot(page: Path, out: Path, height: int, work: Path) -> None:
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if browser is None:
        raise SystemExit("No Chromium on PATH: install Debian's chromium package (apt-get install chromium).")
    full = work / f"{out.stem}-full.png"
    run(browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        f"--user-data-dir={work / 'profile'}", f"--screenshot={full}", f"--window-size=1280,{height}", page.as_uri())
    image = cv2.imread(str(full))
    scaled = cv2.resize(image, (WIDTH_PX, round(image.shape[0] * WIDTH_PX / image.shape[1])),
                        interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(out), scaled, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size // 1024} kB)")


def main(trained: Path | None) -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ich-screenshots-") as folder:
        work = Path(folder)
        runs = work / "outputs"
        if trained is None:
            run(sys.executable, "train.py", *TRAIN, f"hydra.run.dir={runs}/train/run")
            trained = runs / "train" / "run"
        screenshot(trained / "report.html", IMAGES / "report.png", 1700, work)
        run(sys.executable, "-m", "ich.phantom", "--out", str(work / "export"), "--patients", "4", "--seed", "7",
            "--size", "256")
        run(sys.executable, "predict.py", f"ckpt_path={trained}", f"input={work / 'export'}",
            f"hydra.run.dir={runs}/predict/run")
        screenshot(runs / "predict" / "run" / "report.html", IMAGES / "predict-report.png", 1500, work)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else None)
