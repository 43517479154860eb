"""Render a calibration report in headless Chromium and save a PNG screenshot of it.

    python benchmarks/report_screenshot.py [REPORT.html] [--out report.png]

Without a report, the tiny run ``l96-tiny`` is carried out into a temporary folder and its report is used. The
browser is the first of chromium, chromium-browser, google-chrome, google-chrome-stable found on the PATH (or the
``CHROME`` environment variable); without one the script says so and exits with status 3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """The path of a Chromium-like browser, or ``None``."""
    if os.environ.get("CHROME"):
        return os.environ["CHROME"]
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(report: Path, out: Path, browser: str, width: int = 1280, height: int = 4000) -> Path:
    """Save a screenshot of ``report`` (a local HTML file) as the PNG ``out``."""
    cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
           f"--window-size={width},{height}", f"--screenshot={out.resolve()}", report.resolve().as_uri()]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    if not out.exists() or out.stat().st_size == 0:
        raise RuntimeError(f"{browser} wrote no screenshot")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", nargs="?", help="HTML report (default: build the l96-tiny run's report)")
    p.add_argument("--out", default="report.png", help="PNG file to write")
    args = p.parse_args()
    browser = find_browser()
    if browser is None:
        print(f"no headless Chromium found (looked for {', '.join(BROWSERS)} and $CHROME); no screenshot taken")
        return 3
    if args.report:
        report = Path(args.report)
    else:
        from sbida.runs import Run

        folder = Path(tempfile.mkdtemp(prefix="sbida-report-"))
        report = Run("l96-tiny", out=folder, progress=False).report()
    out = screenshot(report, Path(args.out), browser)
    print(f"screenshot of {report} written to {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
