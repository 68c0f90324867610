"""Drive the real ComfyUI frontend (comfyui-frontend-package) in the system Chromium through Playwright.

Used by the UI tests (`frontend` fixture) and by `python -m workflows.regenerate`, which saves the UI-format
twins of workflows/api/*.json exactly as the frontend serializes them. Everything goes through the objects
the frontend itself exposes: `window.app` (ComfyApp) and `window.LiteGraph`.

Chromium comes from the OS (`apt-get install chromium`, done by `make setup`); `playwright install` is never
needed. FLASH_CHROMIUM overrides the executable.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

CHROMIUM = os.environ.get("FLASH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
VIEWPORT = {"width": 1600, "height": 900}

MISSING_MODELS_SETTING = "Comfy.Workflow.ShowMissingModelsWarning"
# Server-side user settings written before the page opens: no first-run template browser over the canvas,
# warnings about missing nodes stay on (the UI tests look for them). The legacy "Missing Models" dialog is off:
# the shipped workflows name real model files the test servers do not have, so it would come up over every
# one of them; the test of that dialog turns it on for itself (Frontend.set_setting).
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    MISSING_MODELS_SETTING: False,
}
# Frontend 1.47 (ComfyUI 0.30 names 1.47.12) replaced the missing-nodes and missing-models dialogs (1.32.9, the
# one ComfyUI 0.3.75 names) by the error system: an overlay "N errors found ... View details" that opens the
# right side panel's Errors tab, with one group per kind (data-testid="error-group-missing-node",
# "error-group-missing-model") and one row per missing model (download, copy URL, locate). It reports missing
# models whatever MISSING_MODELS_SETTING says.
ERROR_SYSTEM_VERSION = (1, 47, 0)
RIGHT_PANEL_SETTING = "Comfy.RightSidePanel.IsOpen"
# The title of the legacy "missing nodes" dialog (locale en, missingNodes.oss.title).
MISSING_NODES_TITLE = "This workflow has missing nodes"
# The legacy "Missing Models" dialog (MissingModelsWarning): a list box of this class, one option per file.
MISSING_MODELS_LIST = ".comfy-missing-models"
APP_READY = "() => window.app && window.app.graph && window.app.canvas && window.LiteGraph && window.app.vueAppReady"


def write_frontend_settings(server_url: str, settings: dict | None = None) -> None:
    """POST the user settings the frontend reads at start-up (ComfyUI stores them server-side)."""
    body = json.dumps(settings or FRONTEND_SETTINGS).encode()
    request = urllib.request.Request(server_url + "/settings", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


class Frontend:
    """One page of the ComfyUI frontend, with the few operations the tests and the regenerator need."""

    def __init__(self, page: Page, server_url: str):
        self.page = page
        self.url = server_url
        self.version: tuple[int, ...] = ()

    def open(self, timeout_ms: int = 90_000) -> Frontend:
        self.page.goto(self.url)
        self.page.wait_for_function(APP_READY, timeout=timeout_ms)
        self.page.wait_for_function("() => Object.keys(window.LiteGraph.registered_node_types).length > 0", timeout=timeout_ms)
        version = self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? '0'")
        self.version = tuple(int(part) for part in version.split("-")[0].split(".") if part.isdigit())
        return self

    @property
    def error_system(self) -> bool:
        """Whether this frontend reports missing nodes and models in its error panel (1.47+), not in dialogs."""
        return self.version >= ERROR_SYSTEM_VERSION

    # -- node library ------------------------------------------------------------------------------
    def registered_node_types(self) -> dict[str, dict]:
        """{node_type: {"category", "title"}} for every type LiteGraph can create in this page."""
        return self.page.evaluate(
            """() => Object.fromEntries(Object.entries(LiteGraph.registered_node_types).map(
                   ([type, cls]) => [type, {category: cls.category ?? null, title: cls.title ?? null}]))"""
        )

    # -- graphs ------------------------------------------------------------------------------------
    def load_graph(self, workflow: dict) -> None:
        """Load a UI-format workflow the way the File > Open / drag-and-drop path does (app.loadGraphData)."""
        self.page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
        self.page.wait_for_timeout(300)  # the missing-nodes report is mounted on the next Vue tick

    def load_api(self, api_workflow: dict, name: str) -> None:
        """Load an API-format workflow (app.loadApiJson: creates nodes with their API ids, titles from
        _meta.title, links, widget values, then app.graph.arrange())."""
        self.page.evaluate("async ([api, name]) => { await window.app.loadApiJson(api, name); }", [api_workflow, name])

    def export(self) -> dict:
        """app.graphToPrompt(): {"workflow": the UI-format graph exactly as the frontend saves and exports it
        (version 0.4), "output": the API-format prompt the Run button would queue}."""
        return self.page.evaluate(
            """async () => {
                const {workflow, output} = await window.app.graphToPrompt();
                return JSON.parse(JSON.stringify({workflow, output}));
            }"""
        )

    def graph_node_types(self) -> dict[str, str]:
        return self.page.evaluate("() => Object.fromEntries(window.app.graph.nodes.map(n => [String(n.id), n.type]))")

    def unregistered_graph_nodes(self) -> list[str]:
        """Types of graph nodes LiteGraph has no class for (what the frontend draws as red 'missing' nodes)."""
        return self.page.evaluate(
            """() => window.app.graph.nodes
                   .filter(n => !(n.type in LiteGraph.registered_node_types))
                   .map(n => n.type)"""
        )

    def missing_nodes_reported(self, wait_ms: int = 0) -> list[str] | None:
        """The node types the frontend reports missing (waiting up to wait_ms for the report), None if it reports
        none: the legacy "This workflow has missing nodes" dialog (its types are not read: []), or the error
        panel's "Missing Node Packs" group."""
        if not self.error_system:
            title = self.page.get_by_text(MISSING_NODES_TITLE).first
            try:
                title.wait_for(state="visible", timeout=max(wait_ms, 1))
            except PlaywrightTimeoutError:
                return None
            return []
        group = self._error_group("missing-node", wait_ms)
        if group is None:
            return None
        card = group.get_by_test_id("missing-node-card").first
        return card.evaluate("card => [...card.querySelectorAll('li button:not([aria-label])')].map(b => b.textContent.trim())")

    def missing_nodes_dialog_visible(self, wait_ms: int = 0) -> bool:
        """Whether the frontend reports missing nodes (legacy dialog or error panel)."""
        return self.missing_nodes_reported(wait_ms) is not None

    def missing_models(self, wait_ms: int = 0) -> list[dict] | None:
        """The missing model files the frontend offers (waiting up to wait_ms), None if it shows none. Each row:
        {"label": "<directory> / <file name>", "url": the download URL, "error": the refusal the row shows, if
        any, "buttons": [{"text", "title", "disabled"}]}. Legacy dialog: the URL is the row's hover title. Error
        panel: the URL is what the row's "Copy URL" button puts on the clipboard."""
        if self.error_system:
            return self._error_panel_models(wait_ms)
        listbox = self.page.locator(MISSING_MODELS_LIST).first
        try:
            listbox.wait_for(state="visible", timeout=max(wait_ms, 1))
        except PlaywrightTimeoutError:
            return None
        return listbox.evaluate(
            """(box) => [...box.querySelectorAll("[role=option]")].map(row => {
                const label = row.querySelector("span[title]");
                return {
                    label: label?.textContent.trim() ?? null,
                    url: label?.getAttribute("title") ?? null,
                    error: row.querySelector(".p-message")?.textContent.trim() || null,
                    buttons: [...row.querySelectorAll("button")].map(b => ({
                        text: b.textContent.trim(), title: b.getAttribute("title"), disabled: b.disabled})),
                };
            })"""
        )

    def _error_group(self, kind: str, wait_ms: int):
        """The error panel's group of `kind` ("missing-node", "missing-model"), opening the panel from the error
        overlay's "View details" as a user would; None if the frontend reports no such error."""
        panel_group = self.page.get_by_test_id(f"error-group-{kind}").first
        if panel_group.count() and panel_group.is_visible():
            return panel_group
        details = self.page.get_by_test_id("error-overlay-see-errors").first
        try:
            details.wait_for(state="visible", timeout=max(wait_ms, 1))
        except PlaywrightTimeoutError:
            return None
        details.click()
        try:
            self.page.get_by_test_id("errors-summary-hero").first.wait_for(state="visible", timeout=10_000)
        except PlaywrightTimeoutError:
            return None
        return panel_group if panel_group.count() else None

    def _error_panel_models(self, wait_ms: int) -> list[dict] | None:
        group = self._error_group("missing-model", wait_ms)
        if group is None:
            return None
        self.page.evaluate(  # what "Copy URL" copies, without the system clipboard of a headless browser
            """() => { window.__flashCopied = [];
                       navigator.clipboard.writeText = async (text) => { window.__flashCopied.push(text); }; }"""
        )
        rows = group.get_by_test_id("missing-model-importable-rows").first.locator(":scope > div")
        found = []
        for index in range(rows.count()):
            row = rows.nth(index)
            info = row.evaluate(
                """(row) => {
                    const name = row.querySelector("button[title]");
                    const directory = name?.parentElement?.nextElementSibling;
                    return {
                        name: name?.textContent.trim() ?? null, directory: directory?.textContent.trim() ?? null,
                        error: row.querySelector(".p-message, [role=alert]")?.textContent.trim() || null,
                        buttons: [...row.querySelectorAll("button")].filter(b => b !== name).map(b => ({
                            text: b.textContent.trim(), title: b.getAttribute("aria-label") ?? b.getAttribute("title"),
                            disabled: b.disabled})),
                    };
                }"""
            )
            url = None
            copy = row.locator('button[title="Copy URL"]').first
            if copy.count():
                copy.click()
                url = self.page.evaluate("() => window.__flashCopied.at(-1) ?? null")
            found.append({"label": f"{info['directory']} / {info['name']}", "url": url, "error": info["error"],
                          "buttons": info["buttons"]})
        return found

    def set_setting(self, setting_id: str, value) -> None:
        """Change a user setting the way the Settings dialog does (the frontend's setting store; stored server-side)."""
        self.page.evaluate("async ([id, value]) => { await window.app.extensionManager.setting.set(id, value); }",
                           [setting_id, value])

    def close_dialogs(self) -> None:
        """Close what reports a loaded graph's problems: the legacy dialogs, or the error overlay and the error
        panel (the right side panel)."""
        self.page.keyboard.press("Escape")
        if self.error_system:
            dismiss = self.page.get_by_test_id("error-overlay-dismiss").first
            if dismiss.count() and dismiss.is_visible():
                dismiss.click()
            self.set_setting(RIGHT_PANEL_SETTING, False)
        self.page.wait_for_timeout(200)

    def set_widget(self, node_id: int, name: str, value) -> None:
        """Set a widget value the way the frontend's widget editing does (value, then the widget's callback)."""
        found = self.page.evaluate(
            """([id, name, value]) => {
                const node = window.app.graph.getNodeById(id);
                const widget = node?.widgets?.find(w => w.name === name);
                if (!widget) return false;
                widget.value = value;
                widget.callback?.(value, window.app.canvas, node);
                window.app.graph.setDirtyCanvas(true, true);
                return true;
            }""",
            [node_id, name, value],
        )
        if not found:
            raise KeyError(f"node {node_id} has no widget {name!r}")

    def toggle_sidebar(self, tab: str) -> None:
        """Click a side toolbar button: "node-library", "queue", "model-library", "workflows", "templates"."""
        self.page.locator(f".{tab}-tab-button").first.click()

    def toggle_job_queue(self) -> None:
        """Open or close the list of jobs: the Queue sidebar (legacy), the Job Queue overlay of frontend 1.47+."""
        if self.error_system:
            self.page.get_by_test_id("queue-overlay-toggle").first.click()
        else:
            self.toggle_sidebar("queue")

    def job_thumbnail(self, filename: str):
        """The job list's thumbnail of the output image `filename` (a locator)."""
        scope = self.page.get_by_test_id("job-assets-list").first if self.error_system else self.page
        return scope.locator(f'img[src*="filename={filename}"]').first

    def node_library_search(self, query: str, category: str, timeout_ms: int = 15_000) -> set[str]:
        """Type `query` into the node library's search box; the display names listed under `category`."""
        if self.error_system:  # frontend 1.47+: "Search...", a flat tree of items with aria-level
            self.page.get_by_placeholder("Search...", exact=True).first.fill(query)
            listed = self.page.wait_for_function(
                """(category) => {
                    const items = [...document.querySelectorAll("[role=treeitem]")];
                    const at = items.findIndex(e => e.hasAttribute("aria-expanded") && e.innerText.trim() === category);
                    if (at < 0) return null;
                    const level = Number(items[at].getAttribute("aria-level")), names = [];
                    for (const item of items.slice(at + 1)) {
                        if (Number(item.getAttribute("aria-level")) <= level) break;
                        names.push(item.innerText.trim());
                    }
                    return names.length ? names : null;
                }""",
                arg=category, timeout=timeout_ms,
            )
            self.page.wait_for_timeout(300)  # the search result tree settles (debounced)
            return set(listed.json_value())
        self.page.get_by_placeholder("Search Nodes").first.fill(query)
        folder = self.page.locator(f'[role=treeitem][aria-label="{category}"]').first
        folder.wait_for(timeout=timeout_ms)
        self.page.wait_for_timeout(300)  # the search result tree settles (debounced)
        items = folder.locator("[role=treeitem]")
        return set(items.evaluate_all("items => items.map(item => item.getAttribute('aria-label'))"))

    # -- running -----------------------------------------------------------------------------------
    def click_run(self) -> None:
        """Press the toolbar's Run button (ComfyQueueButton, data-testid="queue-button")."""
        self.page.get_by_test_id("queue-button").first.click()

    def wait_for_node_image(self, node_id: int, filename: str, timeout_ms: int = 30_000) -> None:
        """Wait until the node shows the image `filename` on the canvas (node.imgs, fed by the 'executed' event)."""
        self.page.wait_for_function(
            "([id, name]) => (window.app.graph.getNodeById(id)?.imgs ?? []).some(img => img.src.includes(name))",
            arg=[node_id, filename], timeout=timeout_ms,
        )

    def screenshot(self, path: str | Path) -> Path:
        self.page.screenshot(path=str(path))
        return Path(path)


@contextmanager
def open_frontend(server_url: str, settings: dict | None = None) -> Iterator[Frontend]:
    """Chromium (headless, system binary) on a fresh page of the server's frontend."""
    write_frontend_settings(server_url, settings)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            yield Frontend(page, server_url).open()
        finally:
            browser.close()


@pytest.fixture(scope="module", name="frontend")
def frontend_fixture(server) -> Iterator[Frontend]:
    """The real frontend of the session's ComfyUI server in a real (headless) Chromium."""
    with open_frontend(server.url) as opened:
        yield opened
