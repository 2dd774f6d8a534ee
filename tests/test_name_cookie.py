"""Mode none in a real browser: the name a person types is remembered by their browser (a cookie set with
extra-streamlit-components' CookieManager, never a URL parameter) and is back after a reload."""

from __future__ import annotations

import pytest
from browser_support import CHROMIUM_ARGS, chromium_path, settle, streamlit_server

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-and-browsers")]  # see pyproject: --dist loadgroup
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytest.importorskip("extra_streamlit_components", reason="extra-streamlit-components is not installed")
if chromium_path() is None:
    pytest.skip("Debian's chromium is not installed (bash scripts/install_browser.sh)", allow_module_level=True)

LABEL = "Your name (recorded on the runs you start)"


def test_the_typed_name_survives_a_reload(zhome, tmp_path):
    with streamlit_server(zhome.home, tmp_path / "server.log") as url, playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{url}/Train", wait_until="domcontentloaded")
            box = page.get_by_label(LABEL)
            box.wait_for(timeout=60_000)
            settle(page, timeout=60)  # as a person does: type once the page is drawn
            box.fill("cookie-carol")
            box.press("Enter")
            page.wait_for_function(
                "() => document.cookie.includes('zimage_user=cookie-carol')", timeout=90_000
            )  # the browser holds it
            assert "cookie-carol" not in page.url
            page.reload(wait_until="domcontentloaded")
            page.get_by_label(LABEL).wait_for(timeout=60_000)
            page.wait_for_function(
                "() => [...document.querySelectorAll('input')].some(i => i.value === 'cookie-carol')", timeout=90_000
            )
            assert page.get_by_label(LABEL).input_value() == "cookie-carol"
            assert "cookie-carol" not in page.url
        finally:
            browser.close()
