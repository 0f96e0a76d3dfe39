#!/usr/bin/env python
"""How long `lmtrain visualize` takes to write a page, and a browser to show it and switch units.

    python scripts/visualize_page_timing.py --checkpoint runs/tinyshakespeare-char/best.pt --text valid-10k.txt

Writes the page into a temporary folder (timing the command and its peak memory), opens it in headless
Chromium three times (the page's own `performance.now()` when its script has drawn the text), then once in a
frame that switches the unit 20 times and shows a gate not shown before. Needs `chromium` on PATH.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from comparison import run_child, text_file

SWITCHES = """<!DOCTYPE html><html><body><iframe id="page" src="page.html"></iframe><script>
const frame = document.getElementById("page");
frame.onload = () => {
  const page = frame.contentDocument, unit = page.getElementById("unit"), shown = page.getElementById("quantity");
  const begin = performance.now();
  for (let i = 1; i <= 20; i++) { unit.value = String(i); unit.dispatchEvent(new Event("change")); }
  const switched = performance.now();
  shown.value = shown.options[shown.options.length - 1].value;
  shown.dispatchEvent(new Event("change"));
  document.body.dataset.result = ((switched - begin) / 20).toFixed(1) + " ms a unit, " +
    (performance.now() - switched).toFixed(1) + " ms for a quantity not shown before";
};
</script></body></html>"""


def dom(browser: str, url: str, profile: Path) -> str:
    return run_child([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                      "--allow-file-access-from-files", f"--user-data-dir={profile}",
                      "--virtual-time-budget=30000", "--dump-dom", url], timeout=300).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=text_file, required=True)
    parser.add_argument("--text", type=text_file, required=True)
    args = parser.parse_args()
    browser = shutil.which("chromium") or parser.error("no chromium on PATH")
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "page.html"
        begin = time.perf_counter()
        run_child([sys.executable, "-m", "lmtrain", "visualize", "--checkpoint", str(args.checkpoint), "--text",
                   str(args.text), "-o", str(page)])
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"page: {page.stat().st_size / 1e6:.1f} MB, written in {time.perf_counter() - begin:.1f} s "
              f"(peak memory {peak:.0f} MB)")
        loads = [re.search(r'data-ready-ms="(\d+)"', dom(browser, page.as_uri(), Path(folder) / "profile")).group(1)
                 for _ in range(3)]
        print(f"shown after {', '.join(loads)} ms (three loads)")
        (Path(folder) / "switches.html").write_text(SWITCHES, encoding="utf-8")
        result = dom(browser, (Path(folder) / "switches.html").as_uri(), Path(folder) / "profile")
        print("switching:", re.search(r'data-result="([^"]*)"', result).group(1))


if __name__ == "__main__":
    main()
