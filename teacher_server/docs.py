"""``GET /docs`` that works offline: Swagger UI served by this server, never from a CDN.

FastAPI's default page loads swagger-ui from jsdelivr and its favicon from fastapi.tiangolo.com,
so on a machine without internet (most of ours) it renders blank. The assets come from the
``fastapi-offline`` wheel (swagger-ui 5, which reads OpenAPI 3.1); without it, ``/docs`` is a plain
HTML list of the routes built from ``app.openapi()``.
"""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"


def swagger_assets() -> Path | None:
    """The folder holding ``swagger-ui-bundle.js`` and ``swagger-ui.css``, or None if not installed."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() and (folder / "swagger-ui.css").is_file() else None


def mount_offline_docs(app: FastAPI, docs_url: str = "/docs") -> None:
    """Serve ``docs_url`` with local assets only (create the app with ``docs_url=None``)."""
    assets = swagger_assets()
    if assets is None:

        @app.get(docs_url, include_in_schema=False)
        async def route_list() -> HTMLResponse:
            return HTMLResponse(routes_page(app))

        return

    app.mount(ASSETS_URL, StaticFiles(directory=assets), name="docs-assets")

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=None,
            # swagger-ui's default validator badge is fetched from validator.swagger.io
            swagger_ui_parameters={"validatorUrl": None},
        )


def routes_page(app: FastAPI) -> str:
    """A self-contained HTML page: every documented route with its summary, and a link to the schema."""
    rows = []
    for path, operations in app.openapi().get("paths", {}).items():
        for method, operation in operations.items():
            summary = operation.get("summary", "")
            rows.append(f"<tr><td>{method.upper()}</td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(summary)}</td></tr>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(app.title)}</title></head><body>"
            f"<h1>{html.escape(app.title)}</h1><p>{html.escape(app.description or '')}</p>"
            f"<p>The full schema: <a href='{app.openapi_url}'>{app.openapi_url}</a> "
            "(install fastapi-offline for the interactive page)</p>"
            f"<table>{''.join(rows)}</table></body></html>")
