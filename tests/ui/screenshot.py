"""The README's picture of /ui: ``python -m tests.ui.screenshot [--out docs/img/ui.png]``.

Serves a copy of the embedded default model (``model_store/cifar10-cascade`` and its members) on 127.0.0.1, sends real
CIFAR-10 test images (synthetic ones where ../shared has no CIFAR-10) while the page polls, unlocks the page
with the server's token (typed into the page, as an operator would) and saves a full-page screenshot taken
with Debian's Chromium. Every request to another host is blocked; the script fails if one was attempted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

from service.api.settings import DEFAULT_MODEL
from tests.api.conftest import TOKEN, sample_pngs
from tests.api.test_e2e import free_port, serve_argv
from tests.ui.conftest import CHROMIUM_ARGS, REPO, _route, chromium_path

MODEL = DEFAULT_MODEL


def _serve(store: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = serve_argv(store, port)
    argv[argv.index("--model") + 1] = MODEL
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSMEANS_")}
    env.update({"CLASSMEANS_ADMIN_TOKEN": TOKEN, "CLASSMEANS_TORCH_THREADS": "1", "NO_PROXY": "127.0.0.1"})
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=store.parent)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, trust_env=False, timeout=10) as c:
        for _ in range(720):
            if proc.poll() is not None:
                raise SystemExit(f"server exited:\n{log.read_text()[-2000:]}")
            try:
                if c.get("/readyz").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    proc.terminate()
    raise SystemExit("server not ready")


def _traffic(url: str, stop: threading.Event, pngs: list[bytes]) -> None:
    with httpx.Client(base_url=url, trust_env=False, timeout=60) as c:
        i = 0
        while not stop.is_set():
            batch = [("file", (f"{k}.png", pngs[(i + k) % len(pngs)], "image/png")) for k in range(4)]
            c.post("/classify", files=batch)
            i += 4
            time.sleep(0.05)


def shoot(out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    work = Path(tempfile.mkdtemp(prefix="ui-shot-"))
    from bench.servers import copy_model  # a cascade's members come with it

    copy_model(REPO / "model_store" / MODEL, work / "store")
    proc, url = _serve(work / "store", work / "serve.log")
    stop = threading.Event()
    feeder = threading.Thread(target=_traffic, args=(url, stop, sample_pngs(256)), daemon=True)
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(work / "chromium"), executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 1000}, device_scale_factor=1)
            outside: list[str] = []
            ctx.route("**/*", _route(outside))
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.goto(url + "/ui")
            feeder.start()
            expect(page.locator("#curve circle.point").first).to_be_visible(timeout=60_000)
            page.fill("#token", TOKEN)
            page.click("#token-use")
            expect(page.locator("#bundles tbody tr").first).to_be_visible(timeout=60_000)
            page.wait_for_timeout(9000)  # a few polls: rates and the histogram fill in
            page.evaluate("document.getElementById('message').hidden = true")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            ctx.close()
            if outside:
                raise SystemExit(f"the page tried to reach other hosts: {outside}")
    finally:
        stop.set()
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "ui.png")
    shoot(parser.parse_args().out)


if __name__ == "__main__":
    main()
