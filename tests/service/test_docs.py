"""The OpenAPI pages work on an air-gapped host: every script, stylesheet and icon comes from the server itself."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest

from service.api import create_app
from service.settings import Settings


def page_and_assets(app, page: str) -> tuple[httpx.Response, dict[str, httpx.Response], httpx.Response]:
    """The page, every asset it references (by URL) and the OpenAPI document, fetched in-process."""

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            html = await client.get(page)
            urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html.text)
            assets = {url: await client.get(url) for url in urls if not re.match(r"(?:https?:)?//", url)}
            assets.update({url: None for url in urls if url not in assets})
            return html, assets, await client.get("/openapi.json")

    return asyncio.run(scenario())


@pytest.mark.parametrize(("page", "bundle_marker"), [("/docs", "SwaggerUIBundle"), ("/redoc", "Redoc")])
def test_docs_pages_load_their_assets_from_this_server(
    loaded_model, model_dir: Path, page: str, bundle_marker: str
) -> None:
    html, assets, openapi = page_and_assets(create_app(Settings(model_dir=model_dir), model=loaded_model), page)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert assets, html.text
    remote = [url for url, asset in assets.items() if asset is None]
    assert remote == [], f"{page} loads {remote} from elsewhere: blank without internet access"
    for url, asset in assets.items():
        assert asset.status_code == 200 and asset.content, url
    scripts = [asset.text for url, asset in assets.items() if url.endswith(".js")]
    assert any(bundle_marker in script for script in scripts), f"{page}: no {bundle_marker} script served"
    # The page points the UI at this server's own OpenAPI document.
    assert "/openapi.json" in html.text and openapi.status_code == 200
