"""The console in a real headless Chromium (the system's, driven by Playwright): sign in,
numbers equal to what the admin API returns after a scripted workload, every action
confirmed and done through the admin API, tenant names rendered as text, a wrong key
refused, no errors in the browser console, axe-core finding no serious or critical
accessibility violation on any page, keyboard navigation, and a screenshot of each page."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from testkit import ADMIN_KEY, Admin, ThreadServer

from .conftest import XSS_NAME, Workload, chat

# The token columns, named and split as the bill prices them, and their API fields.
BILLED = ["Uncached input", "Cache read", "Cache write (5m)", "Cache write (1h)",
          "Cache write (24h)", "Output", "Reserved (GiB·h)", "Stored (M token·h)"]
BILLED_FIELDS = ("uncached_input_tokens", "cached_tokens", "cache_write_5m_tokens",
                 "cache_write_1h_tokens", "cache_write_24h_tokens", "completion_tokens")
AXE = (Path(__file__).parent / "vendor" / "axe.min.js").read_text(encoding="utf-8")
VIEWS = ("overview", "tenants", "tenant", "actions")
# Chromium logs every non-2xx fetch as a console error; a refused key is one on purpose.
_REFUSED = re.compile(r"Failed to load resource: the server responded with a status of 40[13]")


class Console:
    """One browser tab on the console, recording console errors, page errors and dialogs."""

    def __init__(self, page: Any, url: str) -> None:
        self.page = page
        self.url = url
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def open(self) -> Console:
        self.page.goto(self.url + "/admin/ui")
        return self

    def sign_in(self, key: str = ADMIN_KEY) -> None:
        self.page.fill("#admin-key", key)
        self.page.click("#signin-form button[type=submit]")

    def show(self, view: str, arg: str | int | None = None) -> None:
        """Go to a view and wait until it has drawn (the page marks it ready)."""
        target = "#" + (view if arg is None else f"{view}/{arg}")
        if self.page.evaluate("location.hash") == target:
            self.page.click("#refresh")  # the same view: draw it again
        else:
            self.page.evaluate(f"location.hash = {target!r}")
        self.wait(view)

    def wait(self, view: str) -> None:
        self.page.wait_for_selector(f"#view[data-view='{view}'][data-ready]", timeout=30_000)

    def confirm(self, ok: bool = True) -> None:
        self.page.wait_for_selector("#confirm[open]")
        self.page.click("#confirm-ok" if ok else "#confirm-cancel")

    def cell(self, row: str, col: str) -> str:
        text: str = self.page.inner_text(f"{row} td[data-col='{col}']")
        return text

    def status_says(self, pattern: str) -> None:
        self.page.locator("#status").filter(has_text=re.compile(pattern)).wait_for(
            timeout=30_000)

    def axe(self) -> list[dict[str, Any]]:
        self.page.evaluate(AXE)
        violations: list[dict[str, Any]] = self.page.evaluate(
            "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
            ".map(v => ({id: v.id, impact: v.impact, help: v.help,"
            " targets: v.nodes.map(n => n.target.join(' '))}))")
        return violations

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not _REFUSED.search(e)]


@pytest.fixture()
def console(browser: Any, server: ThreadServer) -> Iterator[Console]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    c = Console(page, server.url)
    try:
        yield c
    finally:
        context.close()


def _int(text: str) -> int:
    return int(text.replace(",", "").strip())


def _micros(text: str) -> dict[str, int]:
    """'1,234.000567 USD + 0.000001 EUR' → {'USD': 1234000567, 'EUR': 1}."""
    out = {}
    for part in text.split(" + "):
        amount, _, currency = part.strip().partition(" ")
        units, _, frac = amount.replace(",", "").partition(".")
        out[currency] = int(units) * 1_000_000 + int(frac)
    return out


def _api(admin: Admin, path: str, **params: Any) -> Any:
    r = admin.http.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_sign_in_and_every_page_shows_what_the_api_returns(
        console: Console, admin: Admin, workload: Workload, shots: Path) -> None:
    page = console.open().page
    page.screenshot(path=str(shots / "signin.png"))
    assert page.is_hidden("#nav")
    console.sign_in()
    console.wait("overview")
    assert page.evaluate("document.cookie") == ""  # the key is in no cookie
    assert page.evaluate("localStorage.length") == 0  # nor in storage that outlives the tab

    series = _api(admin, "/admin/usage/series", bucket="hour", since="24h")
    totals = series["totals"]
    assert _int(page.inner_text("[data-kpi=requests]")) == totals["requests"]
    assert _int(page.inner_text("[data-kpi=errors]")) == totals["errors"]
    assert _micros(page.inner_text("[data-kpi=saved]")) == totals["saved_micros_by_currency"]
    assert _micros(page.inner_text("[data-kpi=cost]")) == totals["cost_micros_by_currency"]
    ratio = page.inner_text("[data-kpi=hit_ratio]")
    assert ratio == f"{totals['cached_tokens'] / totals['prompt_tokens'] * 100:.1f}%"
    stats = _api(admin, "/admin/cache/stats")
    evicted = {page.inner_text(f"tbody tr:nth-child({i}) td[data-col=reason]"): None
               for i in range(1, 4)}
    assert set(evicted) <= set(stats["evictions"])
    assert page.locator("td[data-col=tier]").all_inner_texts()[:2] == ["device", "host"]
    bands = _api(admin, "/admin/cache/history")["totals"]["ttft_by_prompt_length"]
    for band in bands:  # time to first token: hit beside miss within each prompt length
        row = f"tr[data-band='{band['prompt_tokens_from']}']"
        assert console.cell(row, "band") == band["label"]
        for side in ("hit", "miss"):
            assert _int(console.cell(row, f"{side}_requests")) == band[side]["requests"]
            want = band[side]["ttft_ms"]
            assert console.cell(row, f"{side}_ttft_ms") == (
                "–" if want is None else f"{want:.1f} ms")
    assert sum(b["hit"]["requests"] for b in bands) >= 3  # the workload's hits are in it
    page.screenshot(path=str(shots / "overview.png"), full_page=True)

    console.show("tenants")
    usage = {r["tenant_id"]: r for r in _api(admin, "/admin/usage", group_by="tenant",
                                              since="30d")["rows"]}
    series_rows = {r["tenant_id"]: r for r in _api(
        admin, "/admin/usage/series", bucket="all", group_by="tenant", since="30d")["rows"]}
    headers = page.locator("#view table thead th").all_inner_texts()
    assert headers[2:12] == ["Requests", *BILLED, "Cost"]  # named as the bill names them
    for tenant in (workload.busy, workload.quiet):
        row = f"tr[data-tenant-id='{tenant.id}']"
        want, kinds = usage[tenant.id], series_rows[tenant.id]
        assert console.cell(row, "name") == tenant.name
        assert _int(console.cell(row, "requests")) == want["requests"]
        assert _int(console.cell(row, "cached_tokens")) == want["cached_tokens"]
        assert _int(console.cell(row, "uncached_input_tokens")) == (
            want["prompt_tokens"] - want["cached_tokens"] - want["cache_write_tokens"])
        assert _int(console.cell(row, "cache_write_5m_tokens")) == kinds["cache_write_5m_tokens"]
        assert _int(console.cell(row, "cache_write_1h_tokens")) == kinds["cache_write_1h_tokens"]
        assert _int(console.cell(row, "cache_write_24h_tokens")) == kinds["cache_write_24h_tokens"]
        assert kinds["cache_write_5m_tokens"] + kinds["cache_write_1h_tokens"] + kinds[
            "cache_write_24h_tokens"] == want["cache_write_tokens"]
        assert _int(console.cell(row, "completion_tokens")) == want["completion_tokens"]
        assert _micros(console.cell(row, "cost")) == {want["currency"]: want["cost_micros"]}
        assert _micros(console.cell(row, "saved")) == {
            want["currency"]: series_rows[tenant.id]["saved_micros"]}
    busy_row = f"tr[data-tenant-id='{workload.busy.id}']"
    assert _int(console.cell(busy_row, "requests")) == 4
    # the first request wrote the shared prompt to the cache (default TTL: the 5m class)
    assert _int(console.cell(busy_row, "cache_write_5m_tokens")) > 0
    page.screenshot(path=str(shots / "tenants.png"), full_page=True)

    console.show("tenant", workload.busy.id)
    hot = _api(admin, "/admin/cache/prefixes", tenant_id=workload.busy.id, limit=10)
    hits = [_int(t) for t in page.locator("td[data-col=hits]").all_inner_texts()]
    assert hits == [p["hits"] for p in hot["prefixes"]] and hits
    keys = _api(admin, f"/admin/tenants/{workload.busy.id}/keys")["data"]
    assert page.locator("tr[data-key-id]").count() == len(keys)
    spend = _api(admin, f"/admin/tenants/{workload.busy.id}/budget")
    for period in ("daily", "monthly"):  # spend this UTC day and month, no budget set
        shown = page.inner_text(f"[data-kpi='budget_{period}']")
        assert _micros(shown.split(" (no budget)")[0]) == {
            spend["currency"]: spend[period]["spent_micros"]}
        assert spend[period]["resets_at"].replace("T", " ").replace("Z", " UTC") in shown
    assert console.cell(f"tr[data-key-id='{workload.busy.key_id}']", "budget_daily").startswith(
        "0.")
    by_key = _api(admin, "/admin/usage/series", bucket="all", group_by="key", since="30d",
                  tenant_id=workload.busy.id)["rows"]
    by_key_table = page.locator("table", has=page.locator("caption", has_text="Usage by key"))
    assert by_key_table.locator("thead th").all_inner_texts()[1:11] == [
        "Requests", *BILLED, "Cost"]
    for r in by_key:
        row = f"tr[data-usage-key='{r['key_id']}']"
        for field in ("requests", *BILLED_FIELDS):
            assert _int(console.cell(row, field)) == r[field], field
    # the tenant's latest signed receipts, as the admin API lists them
    receipts = _api(admin, "/admin/receipts", tenant_id=workload.busy.id, limit=10)["data"]
    assert receipts and page.locator("tr[data-receipt-id]").count() == len(receipts)
    first = f"tr[data-receipt-id='{receipts[0]['id']}']"
    assert console.cell(first, "request") == receipts[0]["request_id"]
    assert _micros(console.cell(first, "cost")) == {receipts[0]["currency"]:
                                                    receipts[0]["cost_micros"]}
    page.screenshot(path=str(shots / "tenant.png"), full_page=True)

    console.show("actions")
    page.screenshot(path=str(shots / "actions.png"), full_page=True)
    assert console.unexpected_errors() == [] and console.dialogs == []


def _vertices(path: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(r"(-?[\d.]+),(-?[\d.]+)", path)]


def test_the_hit_ratio_area_is_filled_down_to_zero(
        console: Console, server: ThreadServer, admin: Admin, model_id: str,
        workload: Workload, shots: Path) -> None:
    """The area under this process's hit ratio closes along the 0 % line, not back to its
    first point, and the line itself is not filled (a filled polyline closes on the
    diagonal from its last point to its first)."""
    from kvgate.gateway.http.console.history import HISTORY, take_sample

    assert server.app is not None
    history = server.app[HISTORY]
    # two intervals with traffic: up to a sample taken now, and from it to the page's own
    history.record(take_sample(server.state.engine.cache_stats(), server.state.metrics))
    chat(server, admin.tenant("charted"), model_id, 2)  # a tenant of its own: no counts move
    page = console.open().page
    console.sign_in()
    console.wait("overview")
    figure = page.locator("figure[data-chart='hit-ratio-live']")
    figure.screenshot(path=str(shots / "hit-ratio-live.png"))
    line = _vertices(figure.locator("polyline").get_attribute("points") or "")
    area = _vertices(figure.locator("path.area").get_attribute("d") or "")
    assert len(line) >= 2
    axis = figure.locator("line.axis").all()
    zero = [float(a.get_attribute("y1") or "nan") for a in axis
            if a.get_attribute("y1") == a.get_attribute("y2")]
    assert len(zero) == 1  # the x axis: where 0 % is drawn
    labels = figure.locator("text").all()
    (zero_label,) = [t for t in labels if t.text_content() == "0.0%"]
    assert float(zero_label.get_attribute("y") or "nan") - 4 == zero[0]
    assert area[:-2] == line  # along the line, then down and back along 0 %
    assert area[-2:] == [(line[-1][0], zero[0]), (line[0][0], zero[0])]
    assert (figure.locator("path.area").get_attribute("d") or "").rstrip().endswith("Z")
    fill = figure.locator("polyline").evaluate("n => getComputedStyle(n).fill")
    assert fill == "none"
    assert console.unexpected_errors() == []


def test_create_tenant_issue_and_revoke_a_key_set_limits_and_flush(
        console: Console, server: ThreadServer, admin: Admin, model_id: str,
        workload: Workload) -> None:
    page = console.open().page
    console.sign_in()
    console.wait("overview")
    console.show("actions")
    name = "made-in-the-console"
    page.fill("#new-name", name)
    page.fill("#new-cache_ttl_seconds", "120")
    page.click("#create-tenant button[type=submit]")
    console.confirm(ok=False)  # cancelled: nothing is created
    assert name not in {t["name"] for t in _api(admin, "/admin/tenants")["data"]}
    page.click("#create-tenant button[type=submit]")
    console.confirm()
    page.wait_for_selector("#create-result a")
    created = {t["name"]: t for t in _api(admin, "/admin/tenants")["data"]}[name]
    assert created["cache_ttl_seconds"] == 120

    page.click("#create-result a")
    console.wait("tenant")
    assert page.inner_text("#view-title") == f"Tenant: {name}"
    page.click("#issue-key")
    console.confirm()
    key = page.locator("#new-key").inner_text()
    assert key.startswith("kvg_")
    models = requests.get(server.url + "/v1/models", timeout=30,
                          headers={"Authorization": f"Bearer {key}"})
    assert models.status_code == 200  # the key shown works
    (issued,) = _api(admin, f"/admin/tenants/{created['id']}/keys")["data"]

    console.show("tenant", created["id"])  # drawn again: the key is in the list now
    assert "kvg_" not in page.inner_text("#view").replace(issued["prefix"], "")
    page.click(f"button[data-revoke='{issued['id']}']")
    console.confirm()
    console.status_says("Revoked key")
    # The view is drawn again after the revoke; fill the limits form only once it has
    # been (a form filled before would be replaced, with what was typed into it).
    page.wait_for_selector(f"button[data-revoke='{issued['id']}']", state="detached",
                           timeout=30_000)
    console.wait("tenant")
    refused = requests.get(server.url + "/v1/models", timeout=30,
                           headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 401

    page.fill("#limit-requests_per_minute", "600")
    page.fill("#limit-cache_quota_bytes", "1048576")
    page.fill("#limit-budget_daily_micros", "5000000")
    page.click("#limits-form button[type=submit]")
    console.confirm()
    console.status_says("Saved limits")
    after = _api(admin, f"/admin/tenants/{created['id']}")
    assert (after["requests_per_minute"], after["cache_quota_bytes"]) == (600, 1048576)
    assert after["budget_daily_micros"] == 5_000_000
    console.wait("tenant")
    page.locator("[data-kpi='budget_daily']").filter(has_text="of 5.000000 USD").wait_for(
        timeout=30_000)
    assert page.inner_text("[data-kpi='budget_daily']").startswith("0.000000 USD of ")
    assert "(no budget)" in page.inner_text("[data-kpi='budget_monthly']")

    chat(server, workload.quiet, model_id, 2)  # something cached to flush
    assert _api(admin, "/admin/cache/prefixes", tenant_id=workload.quiet.id)["prefixes"]
    console.show("tenant", workload.quiet.id)
    page.click("#flush-cache")
    console.confirm(ok=False)
    assert _api(admin, "/admin/cache/prefixes", tenant_id=workload.quiet.id)["prefixes"]
    page.click("#flush-cache")
    console.confirm()
    console.status_says(r"Flushed \d+ blocks")
    assert _api(admin, "/admin/cache/prefixes", tenant_id=workload.quiet.id)["prefixes"] == []
    mine = [t for t in _api(admin, "/admin/cache/stats")["tenants"]
            if t["tenant_id"] == workload.quiet.id]
    assert mine and mine[0]["cached_bytes"] == 0
    assert console.unexpected_errors() == [] and console.dialogs == []


def test_a_tenant_named_with_markup_renders_as_text(console: Console,
                                                   workload: Workload) -> None:
    page = console.open().page
    console.sign_in()
    console.wait("overview")
    console.show("tenants")
    link = page.locator(f"tr[data-tenant-id='{workload.hostile.id}'] td[data-col=name] a")
    assert link.inner_text() == XSS_NAME
    console.show("tenant", workload.hostile.id)
    assert page.inner_text("#view-title") == f"Tenant: {XSS_NAME}"
    console.show("actions")
    assert XSS_NAME in page.inner_text("#jump")
    assert page.locator("img").count() == 0  # no element was made from the name
    page.wait_for_timeout(300)  # an onerror handler would have fired by now
    assert console.dialogs == []
    assert console.unexpected_errors() == []


def test_a_wrong_key_is_refused(console: Console, workload: Workload) -> None:
    page = console.open().page
    console.sign_in("kvg_this_is_not_a_key")
    page.locator("#signin-error").filter(has_text="refused").wait_for()
    assert page.is_hidden("#nav") and page.is_hidden("#view")
    assert page.evaluate("sessionStorage.length") == 0
    console.sign_in(workload.busy.key)  # a tenant's key is not the admin key
    page.locator("#signin-error").filter(has_text="admin key").wait_for()
    assert page.is_hidden("#nav")
    assert console.unexpected_errors() == [] and console.dialogs == []


def test_a_key_revoked_mid_session_signs_the_tab_out(console: Console, admin: Admin,
                                                     workload: Workload) -> None:
    extra = admin.http.post(f"/admin/tenants/{workload.quiet.id}/keys", json={"role": "admin"})
    assert extra.status_code == 201, extra.text
    key = extra.json()
    page = console.open().page
    console.sign_in(key["key"])
    console.wait("overview")
    admin.revoke(key["id"])
    page.evaluate("location.hash = '#tenants'")
    page.locator("#signin-error").filter(has_text="refused").wait_for()
    assert page.is_visible("#signin") and page.evaluate("sessionStorage.length") == 0


@pytest.mark.parametrize("view", ("signin", *VIEWS))
def test_no_serious_accessibility_violations(console: Console, workload: Workload,
                                             view: str) -> None:
    console.open()
    if view != "signin":
        console.sign_in()
        console.wait("overview")
        console.show(view, workload.busy.id if view == "tenant" else None)
    serious = [v for v in console.axe() if v["impact"] in ("serious", "critical")]
    assert serious == [], serious
    assert console.unexpected_errors() == []


def test_keyboard_alone_signs_in_and_moves_between_views(console: Console,
                                                         workload: Workload) -> None:
    page = console.open().page
    assert page.evaluate("document.activeElement.id") == "admin-key"
    page.keyboard.type(ADMIN_KEY)
    page.keyboard.press("Enter")
    console.wait("overview")
    assert page.evaluate("document.activeElement.id") == "view-title"  # focus follows
    for _ in range(12):
        page.keyboard.press("Shift+Tab")
        if page.evaluate("document.activeElement.textContent") == "Tenants":
            break
    else:
        raise AssertionError("the Tenants link is not reachable with the keyboard")
    page.keyboard.press("Enter")
    console.wait("tenants")
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == workload.busy.name:
            break
    else:
        raise AssertionError("no tenant link is reachable with the keyboard")
    page.keyboard.press("Enter")
    console.wait("tenant")
    page.focus("#flush-cache")
    page.keyboard.press("Enter")
    page.wait_for_selector("#confirm[open]")
    assert page.evaluate("document.activeElement.id") == "confirm-cancel"  # safe default
    page.keyboard.press("Escape")
    page.wait_for_selector("#confirm:not([open])", state="attached")
    assert console.unexpected_errors() == []
