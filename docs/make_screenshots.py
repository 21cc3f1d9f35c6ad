"""Screenshot of the reader app's case page for the README: ``python docs/make_screenshots.py``.

Builds a one-reader package of a synthetic phantom (``tests.qa_cohort.write_phantom_cases``) in a
temporary folder, serves it, opens a case in Debian's Chromium (as the browser tests do) and writes
``docs/case_page.png``. Needs ``npm ci`` and ``/usr/bin/chromium``; run from the repository root.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from khe_vol.cli import main  # noqa: E402
from tests.qa_cohort import write_phantom_cases  # noqa: E402
from tests.test_qa_app import reader_browser  # noqa: E402

OUT = REPO / "docs" / "case_page.png"


def case_page_png(out=OUT):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        records, _ = write_phantom_cases(tmp)
        results = tmp / "results"
        assert main(["qa", "package", "--results-dir", str(results), "--reader", "R1", "--seed", "20261201",
                     *map(str, records)]) == 0
        with reader_browser(results, tmp, auto_advance=True) as served:  # the reader's default
            page = served.page
            page.set_viewport_size({"width": 1280, "height": 820})
            page.goto(served.base + "/")
            # The case with a proposed mask (the other waits for a seed).
            for code in page.locator("table.worklist a").all_inner_texts():
                page.goto(f"{served.base}/case/{code}")
                page.wait_for_selector("body[data-ready='1']", timeout=60000)
                if page.evaluate("() => JSON.parse(document.getElementById('case-data').textContent).proposed_mask_url"):
                    break
            page.keyboard.press("o")  # outline: the tissue under the mask stays visible
            page.fill("#comment", "lesion margin follows the T2 bright tissue; fluid collection excluded")
            page.keyboard.press("Escape")
            page.screenshot(path=str(out))
    return out


if __name__ == "__main__":
    print(case_page_png())
