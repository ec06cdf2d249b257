// kvgate operator console. No framework, no build step, no inline code (the page's CSP
// allows none). Every value from the server is put in the page as text (textContent or
// a text node), never as markup: tenant names are whatever a tenant was called.
"use strict";

(function () {
  const KEY_SLOT = "kvgate.adminKey";
  const SVG = "http://www.w3.org/2000/svg";
  let adminKey = sessionStorage.getItem(KEY_SLOT) || "";
  let renderToken = 0;

  // ---- DOM helpers -------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }
  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") node.textContent = String(v);
      else if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
  }
  function append(node, children) {
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }
  const $ = (id) => document.getElementById(id);

  // ---- formatting (integers stay exact: money is integer micro-units) ------------------
  const NUMBER = new Intl.NumberFormat("en-US"); // one formatter: toLocaleString builds one a call
  const fmtInt = (n) => (n === null || n === undefined ? "–" : NUMBER.format(Number(n)));
  function fmtMoney(micros, currency) {
    if (micros === null || micros === undefined) return "–";
    const neg = micros < 0;
    const m = Math.abs(micros);
    const units = Math.floor(m / 1e6);
    const frac = String(m % 1e6).padStart(6, "0");
    return (neg ? "-" : "") + NUMBER.format(units) + "." + frac + (currency ? " " + currency : "");
  }
  function fmtMoneyBy(byCurrency) {
    const parts = Object.entries(byCurrency || {}).map(([c, v]) => fmtMoney(v, c));
    return parts.length ? parts.join(" + ") : fmtMoney(0, "");
  }
  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = n, i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : String(v)) + " " + units[i];
  }
  const fmtPct = (x) => (x === null || x === undefined ? "–" : (x * 100).toFixed(1) + "%");
  const fmtMs = (x) => (x === null || x === undefined ? "–" : x.toFixed(1) + " ms");

  // ---- the admin API -----------------------------------------------------------------
  class ApiFailure extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  async function api(method, path, body) {
    const init = { method, headers: { Authorization: "Bearer " + adminKey }, cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const message = (data && data.error && data.error.message) || ("HTTP " + response.status);
      if (response.status === 401 || response.status === 403) {
        signOut("The admin key was refused: " + message);
      }
      throw new ApiFailure(response.status, message);
    }
    return data;
  }
  const get = (path) => api("GET", path);

  // ---- sign in and out ----------------------------------------------------------------
  function signOut(reason) {
    adminKey = "";
    sessionStorage.removeItem(KEY_SLOT);
    renderToken++;
    $("view").replaceChildren();
    $("view").hidden = true;
    $("nav").hidden = true;
    $("signin").hidden = false;
    $("signin-error").textContent = reason || "";
    $("admin-key").value = "";
    $("admin-key").focus();
  }
  async function signIn(event) {
    event.preventDefault();
    const candidate = $("admin-key").value.trim();
    $("signin-error").textContent = "";
    if (!candidate) { $("signin-error").textContent = "Enter the admin key."; return; }
    const response = await fetch("/admin/tenants", {
      headers: { Authorization: "Bearer " + candidate }, cache: "no-store" });
    if (!response.ok) {
      let message = "HTTP " + response.status;
      try { message = (await response.json()).error.message; } catch (e) { /* keep */ }
      $("signin-error").textContent = "Sign-in refused: " + message;
      return;
    }
    adminKey = candidate;
    sessionStorage.setItem(KEY_SLOT, adminKey);
    $("admin-key").value = "";
    showApp();
  }
  function showApp() {
    $("signin").hidden = true;
    $("nav").hidden = false;
    $("view").hidden = false;
    if (!location.hash || location.hash === "#") location.hash = "#overview";
    else route();
  }

  // ---- confirmation --------------------------------------------------------------------
  function confirmAction(text, okLabel) {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = okLabel || "Confirm";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.returnValue = "cancel";
      dialog.showModal();
      $("confirm-cancel").focus();
    });
  }
  function say(text) { $("status").textContent = text; }

  // ---- charts (hand-drawn SVG) -----------------------------------------------------------
  function chart(title, labels, series, opts) {
    const o = Object.assign({ kind: "line", max: null, fmt: fmtInt, height: 180, area: false, id: null }, opts || {});
    const W = 640, H = o.height, L = 56, R = 10, T = 10, B = 24;
    const values = series.flatMap((s) => s.values.filter((v) => v !== null));
    const top = o.max !== null ? o.max : Math.max(1, ...values);
    const n = Math.max(labels.length, 1);
    const x = (i) => L + (n === 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (n - 1));
    const y = (v) => T + (H - T - B) * (1 - v / top);
    const desc = series.map((s) => s.name + ": " + s.values.filter((v) => v !== null).length +
      " points, latest " + (s.values.length ? o.fmt(s.values[s.values.length - 1]) : "none")).join("; ");
    const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
                           "aria-label": title + ". " + desc });
    for (const f of [0, 0.5, 1]) {
      g.appendChild(svg("line", { x1: L, x2: W - R, y1: y(top * f), y2: y(top * f), class: "grid" }));
      g.appendChild(svg("text", { x: L - 6, y: y(top * f) + 4, "text-anchor": "end", text: o.fmt(top * f) }));
    }
    g.appendChild(svg("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
    g.appendChild(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
    const every = Math.max(1, Math.ceil(n / 6));
    labels.forEach((lab, i) => {
      if (i % every === 0) g.appendChild(svg("text", { x: x(i), y: H - 6, "text-anchor": "middle", text: lab }));
    });
    series.forEach((s, k) => {
      if (o.kind === "bar") {
        const bw = Math.max(1, ((W - L - R) / n) / (series.length + 1));
        s.values.forEach((v, i) => {
          if (v === null) return;
          const x0 = x(i) - (bw * series.length) / 2 + k * bw;
          g.appendChild(svg("rect", { x: x0, y: y(v), width: bw, height: Math.max(0, H - B - y(v)), class: "s" + k }));
        });
      } else {
        const pts = [];
        s.values.forEach((v, i) => { if (v !== null) pts.push([x(i), y(v)]); });
        if (pts.length === 1) {
          g.appendChild(svg("circle", { cx: pts[0][0].toFixed(1), cy: pts[0][1].toFixed(1), r: 3, class: "s" + k }));
        } else if (pts.length) {
          if (o.area) g.appendChild(svg("path", { d: areaPath(pts, y(0)), class: "area s" + k }));
          g.appendChild(svg("polyline", { points: pts.map(xy).join(" "), class: "s" + k }));
        }
      }
    });
    const legend = el("ul", { class: "legend" }, series.map((s, k) => el("li", { class: "k" + k, text: s.name })));
    return el("figure", { "data-chart": o.id }, el("figcaption", { text: title }), g, legend);
  }
  const xy = (p) => p[0].toFixed(1) + "," + p[1].toFixed(1);
  // The area under a line: along its points, then straight down to the zero line and back
  // along it to below the first point. (A filled polyline closes from its last point to its
  // first: a diagonal, not the axis.)
  function areaPath(pts, base) {
    const first = pts[0], last = pts[pts.length - 1];
    return "M" + pts.map(xy).join(" L") + " L" + xy([last[0], base]) + " L" + xy([first[0], base]) + " Z";
  }
  const hourLabel = (iso) => iso.slice(11, 16);
  const dayLabel = (iso) => iso.slice(5, 10);

  // ---- tables ---------------------------------------------------------------------------
  // columns: [header, (row) => value, {cls, col}] ; a value may be a Node
  function table(caption, columns, rows, opts) {
    const head = el("tr", {}, columns.map((c) => el("th", { scope: "col", class: (c[2] || {}).cls, text: c[0] })));
    const body = el("tbody");
    const frag = document.createDocumentFragment();
    for (const r of rows) {
      const tr = el("tr", (opts && opts.rowAttrs) ? opts.rowAttrs(r) : {});
      for (const c of columns) {
        const v = c[1](r);
        const meta = c[2] || {};
        tr.appendChild(el("td", { class: meta.cls, "data-col": meta.col }, v));
      }
      frag.appendChild(tr);
    }
    body.appendChild(frag);
    if (!rows.length) body.appendChild(el("tr", {}, el("td", { colspan: columns.length, class: "text", text: "None." })));
    // focusable, so a keyboard can scroll it; named by its caption for screen readers
    return el("div", { class: "scroll", tabindex: "0", role: "region", "aria-label": caption }, el("table", {}, el("caption", { text: caption }), el("thead", {}, head), body));
  }

  // ---- views ------------------------------------------------------------------------------
  function heading(text) { return el("h1", { id: "view-title", tabindex: "-1", text }); }

  async function overview(token) {
    const [series, stats, history] = await Promise.all([
      get("/admin/usage/series?bucket=hour&since=24h"),
      get("/admin/cache/stats"),
      get("/admin/cache/history"),
    ]);
    if (token !== renderToken) return null;
    const t = series.totals;
    const ratio = t.prompt_tokens ? t.cached_tokens / t.prompt_tokens : null;
    const cards = el("dl", { class: "cards" },
      card("Requests (24 h)", fmtInt(t.requests), "requests"),
      card("Failed or cancelled (24 h)", fmtInt(t.errors), "errors"),
      card("Cache-hit tokens (24 h)", fmtPct(ratio), "hit_ratio"),
      card("Cost (24 h)", fmtMoneyBy(t.cost_micros_by_currency), "cost"),
      card("Saved by the cache (24 h)", fmtMoneyBy(t.saved_micros_by_currency), "saved"),
      card("HTTP errors (this process)", fmtInt(history.totals.errors), "http_errors"));
    // one point per hour, summed over currencies
    const hours = new Map();
    for (const r of series.rows) {
      const h = hours.get(r.start) || { prompt: 0, cached: 0, requests: 0, errors: 0 };
      h.prompt += r.prompt_tokens; h.cached += r.cached_tokens; h.requests += r.requests; h.errors += r.errors;
      hours.set(r.start, h);
    }
    const keys = [...hours.keys()].sort();
    const labels = keys.map(hourLabel);
    const ratioChart = chart("Cache-hit token ratio by hour (ledger)", labels,
      [{ name: "cached / prompt tokens", values: keys.map((k) => (hours.get(k).prompt ? hours.get(k).cached / hours.get(k).prompt : null)) }],
      { max: 1, fmt: fmtPct, area: true, id: "hit-ratio-hourly" });
    const reqChart = chart("Requests and failures by hour (ledger)", labels,
      [{ name: "requests", values: keys.map((k) => hours.get(k).requests) },
       { name: "failed or cancelled", values: keys.map((k) => hours.get(k).errors) }], { kind: "bar" });
    const pts = history.points;
    const liveLabels = pts.map((p) => p.t.slice(11, 19));
    const liveChart = chart("Cache-hit token ratio, this process (sampled every " + history.interval_s + " s)", liveLabels,
      [{ name: "hit ratio", values: pts.map((p) => p.hit_ratio) }], { max: 1, fmt: fmtPct, area: true, id: "hit-ratio-live" });
    const liveReq = chart("HTTP requests and errors, this process", liveLabels,
      [{ name: "requests", values: pts.map((p) => p.requests) }, { name: "errors (4xx, 5xx)", values: pts.map((p) => p.errors) }],
      { kind: "bar" });
    const tiers = Object.entries(stats).filter(([, v]) => v && typeof v === "object" && "capacity_bytes" in v && "used_bytes" in v);
    const occupancy = table("Tier occupancy", [
      ["Tier", (r) => r[0], { cls: "text", col: "tier" }],
      ["Used", (r) => fmtBytes(r[1].used_bytes), { col: "used_bytes" }],
      ["Capacity", (r) => fmtBytes(r[1].capacity_bytes), { col: "capacity_bytes" }],
      ["Full", (r) => fmtPct(r[1].capacity_bytes ? r[1].used_bytes / r[1].capacity_bytes : null), { col: "full" }],
      ["", (r) => meterBar(r[1].capacity_bytes ? r[1].used_bytes / r[1].capacity_bytes : 0, r[0]), { cls: "text" }],
    ], tiers);
    const evictions = table("Evictions by reason (since start)", [
      ["Reason", (r) => r[0], { cls: "text", col: "reason" }], ["Blocks", (r) => fmtInt(r[1]), { col: "blocks" }],
    ], Object.entries(stats.evictions || {}));
    // hits and misses side by side within a band of prompt lengths: over every length a
    // hit on a long prompt looks slower than a miss on a short one
    const ttft = table("Mean time to first token by prompt length, hit vs miss (this process)", [
      ["Prompt tokens", (r) => r.label, { cls: "text", col: "band" }],
      ["Hits", (r) => fmtInt(r.hit.requests), { col: "hit_requests" }],
      ["Hit TTFT", (r) => fmtMs(r.hit.ttft_ms), { col: "hit_ttft_ms" }],
      ["Hit prompt (mean tokens)", (r) => fmtInt(r.hit.mean_prompt_tokens), { col: "hit_prompt_tokens" }],
      ["Misses", (r) => fmtInt(r.miss.requests), { col: "miss_requests" }],
      ["Miss TTFT", (r) => fmtMs(r.miss.ttft_ms), { col: "miss_ttft_ms" }],
      ["Miss prompt (mean tokens)", (r) => fmtInt(r.miss.mean_prompt_tokens), { col: "miss_prompt_tokens" }],
    ], history.totals.ttft_by_prompt_length, { rowAttrs: (r) => ({ "data-band": r.prompt_tokens_from }) });
    const ttftNote = el("p", { class: "note", text: "A hit read part of its prompt from the cache; a miss computed all of it. " +
      "Compare within a row: a long prompt takes longer to its first token than a short one, hit or not." });
    return [heading("Overview"), cards,
      el("h2", { text: "Over the last 24 hours" }), el("div", { class: "grid2" }, ratioChart, reqChart),
      el("h2", { text: "This process" }), el("div", { class: "grid2" }, liveChart, liveReq),
      el("div", { class: "grid2" }, occupancy, evictions), ttft, ttftNote];
  }
  function card(label, value, key) {
    return el("div", { class: "card" }, el("dt", { text: label }), el("dd", { "data-kpi": key, text: value }));
  }
  function meterBar(fraction, name) {
    const f = Math.max(0, Math.min(1, fraction || 0));
    return svg("svg", { viewBox: "0 0 100 10", width: 120, height: 12, role: "img", "aria-label": name + " " + fmtPct(f) + " full" },
      svg("rect", { x: 0, y: 0, width: 100, height: 10, class: "bar-bg" }),
      svg("rect", { x: 0, y: 0, width: (100 * f).toFixed(1), height: 10, class: "bar" }));
  }

  // Token columns named and split as the bill prices them (the ledger's cost_micros):
  // [header, the usage series' field]. Uncached input, cache read and the three cache-write
  // classes add up to the prompt; reserved cache capacity is billed per GiB-hour.
  const BILLED_TOKENS = [["Uncached input", "uncached_input_tokens"], ["Cache read", "cached_tokens"],
    ["Cache write (5m)", "cache_write_5m_tokens"], ["Cache write (1h)", "cache_write_1h_tokens"],
    ["Cache write (24h)", "cache_write_24h_tokens"], ["Output", "completion_tokens"]];
  const TOKENS_NOTE = "Tokens by the kinds the bill prices: uncached input + cache read + cache write (5m, 1h, 24h) = the prompt; output is the answer. Reserved cache is billed per GiB-hour, explicit caches' storage per million token-hours.";
  const GIB_SECONDS_PER_HOUR = 1073741824 * 3600;
  function fmtGibHours(byteSeconds) {
    return ((byteSeconds || 0) / GIB_SECONDS_PER_HOUR).toFixed(3);
  }
  function billedColumns(usageOf) {
    return [...BILLED_TOKENS.map(([header, field]) => [header, (r) => fmtInt(usageOf(r)[field]), { col: field }]),
      ["Reserved (GiB·h)", (r) => fmtGibHours(usageOf(r).reserved_byte_seconds), { col: "reserved_byte_seconds" }],
      ["Stored (M token·h)", (r) => ((usageOf(r).stored_token_seconds || 0) / 3.6e9).toFixed(3), { col: "stored_token_seconds" }]];
  }
  function noUsage() {
    const u = { requests: 0, cost: {}, saved: {}, reserved_byte_seconds: 0, stored_token_seconds: 0 };
    for (const [, field] of BILLED_TOKENS) u[field] = 0;
    return u;
  }

  const RANGES = [["24h", "24 hours"], ["7d", "7 days"], ["30d", "30 days"]];
  let tenantRange = "30d";
  let tenantFilter = "";
  const PAGE_ROWS = 100; // drawn at once; the filter searches them all

  function byTenantStats(stats) {
    const out = new Map();
    for (const t of stats.tenants || []) if (t.tenant_id !== null) out.set(t.tenant_id, t);
    return out;
  }
  function tierBytes(stat, field, tier) {
    return stat && stat[field] ? stat[field][tier] : null;
  }

  async function tenants(token) {
    const [list, usage, stats] = await Promise.all([
      get("/admin/tenants"),
      get("/admin/usage/series?bucket=all&group_by=tenant&since=" + encodeURIComponent(tenantRange)),
      get("/admin/cache/stats"),
    ]);
    if (token !== renderToken) return null;
    const use = new Map();
    for (const r of usage.rows) {
      const u = use.get(r.tenant_id) || noUsage();
      u.requests += r.requests;
      for (const [, field] of BILLED_TOKENS) u[field] += r[field];
      u.reserved_byte_seconds += r.reserved_byte_seconds || 0;
      u.stored_token_seconds += r.stored_token_seconds || 0;
      u.cost[r.currency] = (u.cost[r.currency] || 0) + r.cost_micros;
      u.saved[r.currency] = (u.saved[r.currency] || 0) + r.saved_micros;
      use.set(r.tenant_id, u);
    }
    const cache = byTenantStats(stats);
    const rows = list.data.map((t) => ({ t, u: use.get(t.id) || noUsage(), c: cache.get(t.id) }));
    rows.sort((a, b) => b.u.requests - a.u.requests || a.t.id - b.t.id);
    const select = el("select", { id: "range", on: { change: (e) => { tenantRange = e.target.value; route(); } } },
      RANGES.map(([v, label]) => el("option", { value: v, selected: v === tenantRange, text: label })));
    const filterInput = el("input", { id: "filter", type: "search", value: tenantFilter, autocomplete: "off" });
    const tableBox = el("div");
    let limit = PAGE_ROWS;
    const draw = () => {
      const f = tenantFilter.toLowerCase();
      const matching = f ? rows.filter((r) => r.t.name.toLowerCase().includes(f) || String(r.t.id) === f) : rows;
      const shown = matching.slice(0, limit);
      const more = matching.length - shown.length;
      tableBox.replaceChildren(tenantTable(shown, matching.length),
        more > 0 ? el("button", { type: "button", class: "secondary", id: "show-more",
          text: "Show " + Math.min(more, PAGE_ROWS) + " more of " + more,
          on: { click: () => { limit += PAGE_ROWS; draw(); } } }) : "");
    };
    filterInput.addEventListener("input", (e) => { tenantFilter = e.target.value; limit = PAGE_ROWS; draw(); });
    draw();
    return [heading("Tenants"),
      el("div", { class: "toolbar" },
        el("div", {}, el("label", { for: "range", text: "Usage over the last" }), select),
        el("div", {}, el("label", { for: "filter", text: "Filter by name or id" }), filterInput)),
      el("p", { class: "note", text: TOKENS_NOTE + " Saved by the cache: what the cache reads would have cost as uncached input, at the tenant's current input price. " +
        "Reservations are capacity of each replica's tiers that other tenants cannot evict, billed per GiB-hour; usage per tier is this replica's cache." }),
      tableBox];
  }
  function tenantTable(rows, total) {
    const caption = rows.length === total ? "Tenants (" + total + ")"
      : "Tenants (" + rows.length + " of " + total + ", most requests first)";
    return table(caption, [
      ["Tenant", (r) => el("a", { href: "#tenant/" + r.t.id, text: r.t.name }), { cls: "text name", col: "name" }],
      ["Id", (r) => String(r.t.id), { col: "id" }],
      ["Requests", (r) => fmtInt(r.u.requests), { col: "requests" }],
      ...billedColumns((r) => r.u),
      ["Cost", (r) => fmtMoneyBy(r.u.cost), { col: "cost" }],
      ["Saved by cache", (r) => fmtMoneyBy(r.u.saved), { col: "saved" }],
      ["Reserved (device)", (r) => (r.t.cache_reserved_device_bytes === null ? "none" : fmtBytes(r.t.cache_reserved_device_bytes)), { col: "reserved_device" }],
      ["Reserved (host)", (r) => (r.t.cache_reserved_host_bytes === null ? "none" : fmtBytes(r.t.cache_reserved_host_bytes)), { col: "reserved_host" }],
      ["Quota", (r) => (r.t.cache_quota_bytes === null ? "none" : fmtBytes(r.t.cache_quota_bytes)), { col: "quota" }],
      ["Device used", (r) => fmtBytes(tierBytes(r.c, "used_bytes", "device")), { col: "device_used" }],
      ["Host used", (r) => fmtBytes(tierBytes(r.c, "used_bytes", "host")), { col: "host_used" }],
    ], rows, { rowAttrs: (r) => ({ "data-tenant-id": r.t.id }) });
  }

  async function tenantView(token, id) {
    const q = "tenant_id=" + encodeURIComponent(id);
    const [t, keys, daily, byKey, byModel, hot, stats, receipts, caches, budget] = await Promise.all([
      get("/admin/tenants/" + encodeURIComponent(id)),
      get("/admin/tenants/" + encodeURIComponent(id) + "/keys"),
      get("/admin/usage/series?bucket=day&since=30d&" + q),
      get("/admin/usage/series?bucket=all&group_by=key&since=30d&" + q),
      get("/admin/usage/series?bucket=all&group_by=model&since=30d&" + q),
      get("/admin/cache/prefixes?limit=10&" + q),
      get("/admin/cache/stats"),
      get("/admin/receipts?limit=10&" + q),
      get("/admin/caches?" + q),
      get("/admin/tenants/" + encodeURIComponent(id) + "/budget"),
    ]);
    if (token !== renderToken) return null;
    const days = [...new Set(daily.rows.map((r) => r.start))].sort();
    const sumBy = (field) => days.map((d) => daily.rows.filter((r) => r.start === d).reduce((a, r) => a + r[field], 0));
    const moneyChart = chart("Cost and saved by the cache, by day (micro-units)", days.map(dayLabel),
      [{ name: "cost", values: sumBy("cost_micros") }, { name: "saved by the cache", values: sumBy("saved_micros") }], { kind: "bar" });
    const tokenChart = chart("Prompt tokens by day and billed kind", days.map(dayLabel),
      [{ name: "uncached input", values: sumBy("uncached_input_tokens") }, { name: "cache read", values: sumBy("cached_tokens") },
       { name: "cache write (5m, 1h and 24h)", values: sumBy("cache_write_tokens") }]);
    const c = byTenantStats(stats).get(t.id);
    const tiers = table("Cache reservation and usage by tier (this replica)", [
      ["Tier", (r) => r, { cls: "text" }],
      ["Protected (reservation)", (r) => fmtBytes(tierBytes(c, "share_bytes", r)), { col: "share_bytes" }],
      ["Used", (r) => fmtBytes(tierBytes(c, "used_bytes", r)), { col: "used_bytes" }],
      ["Evicted by others", (r) => fmtInt(tierBytes(c, "evicted_by_others", r)), { col: "evicted_by_others" }],
    ], ["device", "host"]);
    const settings = el("dl", { class: "cards" },
      card("Status", t.status, "status"), card("Plan", String(t.plan), "plan"),
      card("Cache TTL", fmtInt(t.cache_ttl_seconds) + " s", "ttl"),
      card("Quota", t.cache_quota_bytes === null ? "none" : fmtBytes(t.cache_quota_bytes), "quota"),
      card("Reserved", t.cache_reserved_device_bytes === null && t.cache_reserved_host_bytes === null ? "none"
        : "device " + fmtBytes(t.cache_reserved_device_bytes || 0) + ", host " + fmtBytes(t.cache_reserved_host_bytes || 0), "reserved"),
      card("Longest TTL asked", fmtInt(t.cache_max_ttl_seconds) + " s", "max_ttl"),
      card("Hit rate (since start)", c ? fmtPct(c.hit_rate) : "–", "hit_rate"),
      ...["daily", "monthly"].map((p) => card((p === "daily" ? "Spent today" : "Spent this month") + " (UTC)",
        budgetText(budget[p], budget.currency) + ", resets " + budget[p].resets_at.replace("T", " ").replace("Z", " UTC"), "budget_" + p)));
    const keyBudget = new Map(budget.keys.map((k) => [k.id, k]));
    const hotTable = table("Hottest prefixes (never the text)", [
      ["Hash", (r) => el("span", { class: "mono", title: r.hash, text: r.hash.slice(0, 16) + "…" }), { cls: "text", col: "hash" }],
      ["Tokens", (r) => fmtInt(r.tokens), { col: "tokens" }], ["Hits", (r) => fmtInt(r.hits), { col: "hits" }],
      ["Tier", (r) => r.tier, { col: "tier" }], ["Last use", (r) => r.last_used.replace("T", " ").slice(0, 19) + " UTC", { col: "last_used" }],
    ], hot.prefixes);
    const keyUsage = table("Usage by key (30 days)", [
      ["Key", (r) => (r.key_id === null ? "(none)" : r.key_prefix + "… (#" + r.key_id + ")"), { cls: "text", col: "key" }],
      ["Requests", (r) => fmtInt(r.requests), { col: "requests" }], ...billedColumns((r) => r),
      ["Cost", (r) => fmtMoney(r.cost_micros, r.currency), { col: "cost" }], ["Saved", (r) => fmtMoney(r.saved_micros, r.currency), { col: "saved" }],
    ], byKey.rows, { rowAttrs: (r) => ({ "data-usage-key": r.key_id === null ? "none" : r.key_id }) });
    const modelUsage = table("Usage by model (30 days)", [
      ["Model", (r) => r.model, { cls: "text", col: "model" }],
      ["Requests", (r) => fmtInt(r.requests), { col: "requests" }], ...billedColumns((r) => r),
      ["Cost", (r) => fmtMoney(r.cost_micros, r.currency), { col: "cost" }], ["Saved", (r) => fmtMoney(r.saved_micros, r.currency), { col: "saved" }],
    ], byModel.rows);
    const receiptTable = table("Latest receipts (signed bills; the tenant reads them at /v1/receipts/{id})", [
      ["Receipt", (r) => el("span", { class: "mono", title: r.id, text: r.id.slice(0, 14) + "…" }), { cls: "text", col: "receipt" }],
      ["Request", (r) => el("span", { class: "mono", text: r.request_id }), { cls: "text", col: "request" }],
      ["Finished", (r) => String(r.finished_at).slice(0, 19).replace("T", " ") + " UTC", { col: "finished" }],
      ["Endpoint", (r) => r.endpoint, { col: "endpoint" }],
      ["Prompt", (r) => fmtInt(r.tokens.prompt), { col: "prompt" }], ["Cache read", (r) => fmtInt(r.tokens.cached), { col: "cached" }],
      ["Output", (r) => fmtInt(r.tokens.completion), { col: "completion" }],
      ["Cost", (r) => fmtMoney(r.cost_micros, r.currency), { col: "cost" }],
    ], receipts.data, { rowAttrs: (r) => ({ "data-receipt-id": r.id }) });
    const cacheTable = table("Explicit caches (pinned prefixes, storage billed per token-hour; never the text)", [
      ["Cache", (r) => el("span", { class: "mono", title: r.id, text: r.id.slice(0, 14) + "…" }), { cls: "text", col: "cache" }],
      ["Name", (r) => r.display_name || "", { cls: "text", col: "display_name" }],
      ["Tokens", (r) => fmtInt(r.tokens), { col: "tokens" }],
      ["Expires", (r) => new Date(r.expires_at * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC", { col: "expires" }],
    ], caches.data, { rowAttrs: (r) => ({ "data-cache-id": r.id }) });
    const keyOut = el("div", { id: "key-output", role: "status" });
    const keyTable = table("Keys", [
      ["Prefix", (r) => el("span", { class: "mono", text: r.prefix + "…" }), { cls: "text", col: "prefix" }],
      ["Id", (r) => String(r.id), { col: "id" }], ["Role", (r) => r.role, { col: "role" }],
      ["Created", (r) => String(r.created_at).slice(0, 19).replace("T", " "), { col: "created" }],
      ["State", (r) => (r.revoked_at ? "revoked" : "active"), { col: "state" }],
      ...["daily", "monthly"].map((p) => [p === "daily" ? "Today (UTC)" : "This month",
        (r) => (keyBudget.has(r.id) ? budgetText(keyBudget.get(r.id)[p], budget.currency) : "–"), { col: "budget_" + p }]),
      ["", (r) => (r.revoked_at ? "" : el("button", { type: "button", class: "danger", "data-revoke": r.id,
        "aria-label": "Revoke key " + r.prefix + "…", text: "Revoke",
        on: { click: () => revokeKey(t, r) } })), { cls: "text" }],
    ], keys.data, { rowAttrs: (r) => ({ "data-key-id": r.id }) });
    const actions = el("div", { class: "buttons" },
      el("button", { type: "button", id: "issue-key", text: "Issue a key", on: { click: () => issueKey(t, keyOut) } }),
      el("button", { type: "button", id: "flush-cache", class: "danger", text: "Flush this tenant's cache", on: { click: () => flushCache(t) } }));
    return [el("p", {}, el("a", { href: "#tenants", text: "← All tenants" })),
      heading("Tenant: " + t.name), settings,
      el("h2", { text: "Usage" }), el("div", { class: "grid2" }, moneyChart, tokenChart),
      el("p", { class: "note", text: TOKENS_NOTE }), keyUsage, modelUsage, receiptTable,
      el("h2", { text: "Cache" }), tiers, cacheTable, hotTable,
      el("h2", { text: "Keys" }), actions, keyOut, keyTable,
      el("h2", { text: "Limits" }), limitsForm(t)];
  }

  function budgetText(b, currency) {
    const spent = fmtMoney(b.spent_micros, currency);
    return b.budget_micros === null ? spent + " (no budget)" : spent + " of " + fmtMoney(b.budget_micros, currency);
  }

  const LIMITS = [
    ["cache_ttl_seconds", "Cache TTL (seconds)"], ["cache_quota_bytes", "Cache quota (bytes, empty: none)"],
    ["cache_reserved_device_bytes", "Reserved device cache (bytes, billed per GiB-hour; empty: none)"],
    ["cache_reserved_host_bytes", "Reserved host cache (bytes, billed per GiB-hour; empty: none)"],
    ["cache_max_ttl_seconds", "Longest cache TTL a request may ask (seconds)"],
    ["requests_per_minute", "Requests per minute (empty: no limit)"],
    ["tokens_per_minute", "Tokens per minute (empty: no limit)"], ["max_concurrent", "Concurrent requests (empty: no limit)"],
    ["budget_daily_micros", "Spend budget per UTC day (micro-units of the plan's currency; empty: none)"],
    ["budget_monthly_micros", "Spend budget per UTC month (micro-units; empty: none)"],
  ];
  function limitsForm(t) {
    const inputs = LIMITS.map(([name, label]) => {
      const input = el("input", { id: "limit-" + name, name, inputmode: "numeric", pattern: "[0-9]*",
                                  value: t[name] === null || t[name] === undefined ? "" : String(t[name]) });
      return el("div", {}, el("label", { for: "limit-" + name, text: label }), input);
    });
    const form = el("form", { class: "row-form", id: "limits-form" }, inputs,
      el("div", { class: "buttons" }, el("button", { type: "submit", text: "Save limits" })));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const body = {};
      for (const [name] of LIMITS) {
        const raw = form.elements[name].value.trim();
        const current = t[name] === null || t[name] === undefined ? "" : String(t[name]);
        if (raw === current) continue;
        if (raw !== "" && !/^[0-9]+$/.test(raw)) { say("'" + name + "' must be a whole number."); return; }
        if (raw === "" && name === "cache_ttl_seconds") { say("The cache TTL needs a value."); return; }
        body[name] = raw === "" ? null : Number(raw);
      }
      if (!Object.keys(body).length) { say("Nothing changed."); return; }
      const summary = Object.entries(body).map(([k, v]) => k + " = " + (v === null ? "none" : v)).join(", ");
      if (!(await confirmAction("Set " + summary + " for tenant " + t.name + "?", "Save"))) return;
      await guarded(async () => {
        await api("PATCH", "/admin/tenants/" + t.id, body);
        say("Saved limits for " + t.name + ".");
        route();
      });
    });
    return form;
  }
  async function issueKey(t, out) {
    if (!(await confirmAction("Issue a new API key for tenant " + t.name + "? It is shown once.", "Issue key"))) return;
    await guarded(async () => {
      const key = await api("POST", "/admin/tenants/" + t.id + "/keys");
      out.replaceChildren(el("p", { text: "New key (shown once; copy it now):" }),
        el("code", { class: "secret", id: "new-key", text: key.key }));
      say("Issued key #" + key.id + ".");
    });
  }
  async function revokeKey(t, k) {
    if (!(await confirmAction("Revoke key " + k.prefix + "… (#" + k.id + ") of tenant " + t.name + "? Requests with it fail at once.", "Revoke"))) return;
    await guarded(async () => {
      await api("DELETE", "/admin/keys/" + k.id);
      say("Revoked key #" + k.id + ".");
      route();
    });
  }
  async function flushCache(t) {
    if (!(await confirmAction("Flush every cached block of tenant " + t.name + "? Its next prompts are computed again.", "Flush"))) return;
    await guarded(async () => {
      const r = await api("DELETE", "/admin/cache?tenant_id=" + t.id);
      say("Flushed " + r.flushed_blocks + " blocks of " + t.name + ".");
    });
  }

  async function actions(token) {
    const list = await get("/admin/tenants");
    if (token !== renderToken) return null;
    const fields = [["name", "Name", "text"], ["plan", "Price plan (name or id; empty: default)", "text"],
      ["cache_ttl_seconds", "Cache TTL (seconds; empty: default)", "num"],
      ["cache_quota_bytes", "Cache quota (bytes; empty: none)", "num"],
      ["cache_reserved_device_bytes", "Reserved device cache (bytes; empty: none)", "num"],
      ["cache_reserved_host_bytes", "Reserved host cache (bytes; empty: none)", "num"]];
    const form = el("form", { class: "row-form", id: "create-tenant" },
      fields.map(([name, label, kind]) => el("div", {}, el("label", { for: "new-" + name, text: label }),
        el("input", { id: "new-" + name, name, required: name === "name", autocomplete: "off",
                      inputmode: kind === "num" ? "numeric" : null }))),
      el("div", { class: "buttons" }, el("button", { type: "submit", text: "Create tenant" })));
    const result = el("div", { id: "create-result", role: "status" });
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const body = {};
      for (const [name, , kind] of fields) {
        const raw = form.elements[name].value.trim();
        if (raw === "") continue;
        if (kind === "num" && !/^[0-9]+$/.test(raw)) { say("'" + name + "' must be a whole number."); return; }
        body[name] = kind === "num" ? Number(raw) : raw;
      }
      if (!body.name) { say("A tenant needs a name."); return; }
      if (!(await confirmAction("Create tenant " + body.name + "?", "Create"))) return;
      await guarded(async () => {
        const t = await api("POST", "/admin/tenants", body);
        result.replaceChildren(el("p", {}, "Created tenant ", el("a", { href: "#tenant/" + t.id, text: t.name }),
          " (id " + t.id + "). Open it to issue its first key."));
        form.reset();
        say("Created tenant " + t.name + ".");
      });
    });
    const jump = el("select", { id: "jump" }, el("option", { value: "", text: "Choose a tenant…" }),
      list.data.map((t) => el("option", { value: String(t.id), text: t.name + " (#" + t.id + ")" })));
    jump.addEventListener("change", () => { if (jump.value) location.hash = "#tenant/" + jump.value; });
    return [heading("Actions"), el("h2", { text: "Create a tenant" }), form, result,
      el("h2", { text: "Keys, limits and cache of a tenant" }),
      el("p", { class: "note", text: "Issue or revoke keys, set limits, TTL, quota and reservation, or flush the cache on the tenant's page. Every action asks first." }),
      el("label", { for: "jump", text: "Go to tenant" }), jump];
  }

  async function guarded(fn) {
    try { await fn(); } catch (e) {
      if (e instanceof ApiFailure && (e.status === 401 || e.status === 403)) return;
      say("Failed: " + e.message);
    }
  }

  // ---- routing -------------------------------------------------------------------------
  async function route() {
    if (!adminKey) return;
    const token = ++renderToken;
    const t0 = performance.now();
    const hash = location.hash.replace(/^#/, "") || "overview";
    const [name, arg] = hash.split("/");
    for (const a of document.querySelectorAll("#nav a")) {
      const current = a.dataset.view === name || (name === "tenant" && a.dataset.view === "tenants");
      if (current) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    }
    const view = $("view");
    delete view.dataset.ready;
    view.setAttribute("aria-busy", "true");
    try {
      let nodes;
      if (name === "tenants") nodes = await tenants(token);
      else if (name === "tenant" && /^[0-9]+$/.test(arg || "")) nodes = await tenantView(token, arg);
      else if (name === "actions") nodes = await actions(token);
      else nodes = await overview(token);
      if (nodes === null || token !== renderToken) return;
      view.replaceChildren(...nodes);
      view.dataset.view = name;
      void view.offsetHeight; // style and layout now, so the time below includes them
      view.dataset.ms = (performance.now() - t0).toFixed(1); // fetch to laid out (bench/console.py)
      const title = $("view-title");
      document.title = (title ? title.textContent + " · " : "") + "kvgate console";
      if (title && document.activeElement !== $("range") && document.activeElement !== $("filter")) title.focus();
      view.dataset.ready = String(token);
    } catch (e) {
      if (token !== renderToken) return;
      if (e instanceof ApiFailure && (e.status === 401 || e.status === 403)) return;
      view.replaceChildren(heading("Could not load this view"), el("p", { class: "error", role: "alert", text: e.message }));
      view.dataset.ready = String(token);
    } finally {
      view.removeAttribute("aria-busy");
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("signin-form").addEventListener("submit", signIn);
    $("signout").addEventListener("click", () => signOut("Signed out."));
    $("refresh").addEventListener("click", () => route());
    window.addEventListener("hashchange", route);
    if (adminKey) showApp(); else $("admin-key").focus();
  });
})();
