"""Screenshot of `imgclf review` for the README (docs/review.png), taken in the system Chromium.

    python benchmarks/review_screenshot.py runs/cv-photos --out docs/review.png

Starts the review app of TARGET on a free local port (in this process), opens it with
Playwright driving /usr/bin/chromium, optionally moves to an item and records one decision, and
saves the page. Decisions made here go to TARGET/corrections.csv like any other: pass a copy of
the folder when that matters (--decide none leaves the file alone).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import threading
import time
from pathlib import Path

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/review.png"))
    ap.add_argument("--queue", default="label_issues")
    ap.add_argument("--index", type=int, default=0, help="item shown (0: the first)")
    ap.add_argument("--decide", default="none", help="key pressed on the item before it: none, s, x, ...")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=760)
    args = ap.parse_args()

    import uvicorn
    from playwright.sync_api import sync_playwright

    from imgclf.commands.review import ReviewSession, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(ReviewSession(args.target)),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                         args=ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#tabs button.active")
            page.click(f"#tabs button[data-queue={args.queue}]")
            if args.decide != "none" and args.index > 0:
                for _ in range(args.index - 1):
                    page.keyboard.press("ArrowRight")
                page.keyboard.press(args.decide)  # decides and moves on to --index
            else:
                for _ in range(args.index):
                    page.keyboard.press("ArrowRight")
            page.wait_for_function("document.getElementById('image').complete")
            time.sleep(0.5)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            browser.close()
    finally:
        server.should_exit = True
        thread.join(10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
