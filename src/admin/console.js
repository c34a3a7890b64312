// castellum admin console: polls /admin/v1/status every second and renders it; every lever asks
// for confirmation, then calls the admin API. Data is only ever inserted as text.
"use strict";

const state = { token: sessionStorage.getItem("castellum-admin-token") || "", previous: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

const badge = (text) => el("span", { class: `badge ${text}` }, text);
const ago = (ms) => (ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(1)} s`);
const when = (ms) => new Date(ms).toLocaleTimeString();

// A small line chart of one series (SVG built node by node: no markup is parsed).
function sparkline(label, points, pick, unit) {
  const SVG = "http://www.w3.org/2000/svg";
  const [w, h] = [140, 28];
  const values = points.map(pick);
  const top = Math.max(...values, 1e-9);
  const svg = document.createElementNS(SVG, "svg");
  for (const [k, v] of [["width", w], ["height", h], ["viewBox", `0 0 ${w} ${h}`], ["class", "spark"]]) svg.setAttribute(k, v);
  const line = document.createElementNS(SVG, "polyline");
  const step = values.length > 1 ? w / (values.length - 1) : 0;
  line.setAttribute("points", values.map((v, i) => `${(i * step).toFixed(1)},${(h - 2 - (v / top) * (h - 4)).toFixed(1)}`).join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "currentColor");
  line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  const now = values.length ? values[values.length - 1] : 0;
  return el("div", { class: "series", "data-series": label }, el("span", {}, `${label} ${now.toFixed(1)}${unit}`), svg);
}

function kv(container, pairs) {
  container.replaceChildren(...pairs.flatMap(([k, v]) => [el("span", {}, k), el("span", {}, v)]));
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${state.token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401) {
    document.getElementById("login").style.display = "flex";
    throw new Error("sign in with an admin token");
  }
  const json = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(json.detail || `${response.status}`);
  return json;
}

async function lever(what, method, path, body) {
  if (!window.confirm(`${what}?`)) return;
  const shown = document.getElementById("lever-error");
  try {
    await api(method, path, body);
    shown.textContent = "";
    await refresh();
  } catch (e) {
    shown.textContent = `${what} failed: ${e.message}`;
  }
}

function caButtons(cell) {
  const path = `/admin/v1/cas/${encodeURIComponent(cell.ca)}`;
  const button = (label, action, fn) => el("button", { "data-action": action, "data-ca": cell.ca, onclick: fn }, label);
  const setState = (label, action, to) => button(label, action, () => lever(`${label} ${cell.ca}`, "POST", `${path}/state`, { state: to }));
  const out = [];
  if (cell.state === "down") return out; // a dead cell: no lever restarts it
  if (cell.state === "enabled") out.push(setState("Park", "park", "parked"), setState("Drain", "drain", "draining"), setState("Disable", "disable", "disabled"));
  else if (cell.state !== "retired") out.push(setState(cell.state === "parked" ? "Unpark" : "Enable", "enable", "enabled"));
  if (cell.parked > 0 && cell.state === "enabled") out.push(button("Resubmit parked", "resubmit", () => lever(`Resubmit the parked requests of ${cell.ca}`, "POST", `${path}/resubmit`, {})));
  if (cell.breaker !== "closed") out.push(button("Reset breaker", "reset-breaker", () => lever(`Reset the breaker of ${cell.ca}`, "POST", `${path}/breaker/reset`, {})));
  return out;
}

function render(status) {
  const now = Date.now();
  document.getElementById("meta").textContent =
    `instance ${status.instance} · registry v${status.registry_version} · updated ${new Date().toLocaleTimeString()}`;
  document.getElementById("error").textContent = (status.warnings || []).join(" · ");

  document.getElementById("instances").replaceChildren(...status.instances.map((i) =>
    el("tr", {}, el("td", {}, i.id), el("td", {}, i.address), el("td", {}, `${i.uptime_s} s`),
      el("td", {}, i.registry_version), el("td", {}, `${ago(now - i.heartbeat_at)} ago`),
      el("td", {}, badge(i.stale ? "stale" : "ok")))));

  // Every other instance's tree, as it published it with its last heartbeat.
  document.getElementById("peers").replaceChildren(...status.instances.filter((i) => i.id !== status.instance).map((i) => {
    const cells = (i.tree && i.tree.cells) || [];
    const pools = (i.tree && i.tree.pools) || [];
    return el("details", { "data-instance": i.id },
      el("summary", {}, `${i.id}: ${cells.length} CA cells`, i.stale ? " (stale)" : ""),
      el("table", {}, el("tbody", {}, ...cells.map((c) => el("tr", {},
        el("td", {}, c.ca), el("td", {}, badge(c.state)), el("td", {}, badge(c.breaker)),
        el("td", {}, `queues ${c.interactive_queued}/${c.background_queued}`), el("td", {}, `in flight ${c.in_flight}`),
        el("td", {}, c.key_available ? "key loaded" : "KEY UNAVAILABLE"), el("td", {}, `${c.signatures} signed`))))),
      el("div", { class: "small" }, pools.map((p) => `${p.name} ${p.in_use}/${p.max} in use, wait p99 ${p.wait_p99_ms.toFixed(2)} ms, longest hold ${p.longest_hold_ms} ms`).join(" · ")));
  }));

  kv(document.getElementById("tree"), [
    ["Registry", `version ${status.registry_version}, ${status.profiles.length} profiles`],
    ["Intake", `${status.cells.length} CA cells`],
  ]);

  const before = state.previous ? Object.fromEntries(state.previous.cells.map((c) => [c.ca, c])) : {};
  const seconds = state.previous ? Math.max((now - state.previous.at) / 1000, 0.001) : 1;
  const refusals = Object.fromEntries((status.refusals || []).map((r) => [r.ca, r]));
  const refusalText = (r) => !r ? "none in the last minute" :
    `${r.per_second.toFixed(1)}/s over ${Math.round(r.window_s)} s · ` +
    r.by_reason.map(([why, n]) => `${why} ${n.toFixed(1)}/s`).join(", ") +
    ` · refused most: ${r.top_clients.map(([client, n]) => `${client} (${n})`).join(", ")}`;
  document.getElementById("cells").replaceChildren(...status.cells.map((c) => {
    const rate = before[c.ca] ? ((c.signatures - before[c.ca].signatures) / seconds).toFixed(1) : "…";
    const details = el("div", { class: "kv" });
    kv(details, [
      ["interactive queue", `${c.interactive_queued} (oldest ${ago(c.interactive_oldest_ms)})`],
      ["background queue", `${c.background_queued} (oldest ${ago(c.background_oldest_ms)})`],
      ["parked", c.parked === null ? "unknown" : c.parked],
      ["in flight", c.in_flight],
      ["signer", `${c.key_available ? "key loaded" : "KEY UNAVAILABLE"} · ${rate}/s · mean ${c.mean_sign_us} µs`],
      ["breaker transitions", c.breaker_transitions.map(([at, to]) => `${when(at)} ${to}`).join(", ") || "none"],
      ["restarts", c.restarts],
      ["refusals", refusalText(refusals[c.ca])],
    ]);
    const history = c.history || [];
    const charts = el("div", { class: "history", "data-points": history.length },
      sparkline("issued/s", history, (p) => p.issued_per_s, ""),
      sparkline("p99", history, (p) => p.p99_ms, " ms"),
      sparkline("queued", history, (p) => p.queued, ""),
      sparkline("refusals/s", history, (p) => p.refusals_per_s, ""));
    return el("div", { class: "cell", "data-ca": c.ca },
      el("h3", {}, c.ca, el("span", { class: `badge ${c.state}`, "data-field": "state" }, c.state), badge(c.breaker)),
      details, charts, el("div", {}, ...caButtons(c)));
  }));

  const s = status.store;
  const rows = s ? [["Store", `${s.workers} workers · ${s.batches_in_flight} batches in flight · ${s.pending_writes} writes waiting${s.database_down ? " · DATABASE DOWN" : ""}`]] : [["Store", "no answer"]];
  const ids = status.identities;
  if (ids) {
    const stock = ids.key_stock.map((k) => `${k.key} ${k.stocked}/${k.target}`).join(" · ") || "none";
    rows.push(["Identity keys in stock", stock], ["Identity vault", `${ids.vault_waiting} signatures waiting`]);
  }
  for (const head of status.audit_chains || []) {
    rows.push([`Audit chain of ${head.instance}`, `seq ${head.seq} · ${head.hash.slice(0, 16)}…`]);
  }
  const v = status.audit_verified;
  rows.push(["Audit chain verified", !v ? "not yet" :
    `${when(v.at)}: ${v.fault ? `BROKEN — ${v.fault}` : `${v.verified} rows hold`}`]);
  kv(document.getElementById("store"), rows);
  document.getElementById("pools").replaceChildren(...status.pools.map((p) =>
    el("tr", {}, el("td", {}, p.name), el("td", {}, p.in_use), el("td", {}, p.idle), el("td", {}, p.max),
      el("td", {}, `${p.wait_p99_ms.toFixed(2)} ms`), el("td", {}, p.timeouts), el("td", {}, ago(p.longest_hold_ms)))));

  document.getElementById("profiles").replaceChildren(...status.profiles.map(([id, st]) => {
    const enable = st !== "enabled";
    const path = `/admin/v1/profiles/${encodeURIComponent(id)}/state`;
    return el("tr", {}, el("td", {}, id), el("td", {}, badge(st)), el("td", {},
      el("button", { "data-action": enable ? "enable-profile" : "disable-profile", "data-profile": id,
        onclick: () => lever(`${enable ? "Enable" : "Disable"} profile ${id}`, "POST", path, { enabled: enable }) },
      enable ? "Enable" : "Disable")));
  }));

  renderRevocation(status.revocation, now);

  document.getElementById("audit").replaceChildren(...status.audit.slice(0, 20).map((a) =>
    el("tr", {}, el("td", {}, when(a.at)), el("td", {}, a.instance), el("td", {}, a.actor), el("td", {}, a.action),
      el("td", {}, a.target), el("td", {}, a.outcome), el("td", { class: "small" }, a.detail))));

  state.previous = { at: now, cells: status.cells };
}

// RFC 5280 reasons an operator may give (certificateHold and removeFromCRL are not offered).
const REASONS = ["unspecified", "keyCompromise", "cACompromise", "affiliationChanged", "superseded",
  "cessationOfOperation", "privilegeWithdrawn", "aACompromise"];

function reasonSelect(select) {
  if (select.options.length === 0) select.replaceChildren(...REASONS.map((r) => el("option", { value: r }, r)));
  return select;
}

function renderRevocation(revocation, now) {
  if (!revocation) return;
  const revoked = Object.fromEntries(revocation.revoked);
  const responders = Object.fromEntries(revocation.responders.map((r) => [r.ca, r]));
  const cas = [...new Set(revocation.shards.map((s) => s.ca))].sort();
  const responderText = (r) => {
    if (!r) return "off";
    if (r.expires_at === null) return `no certificate yet${r.renewal_error ? ` · renewal failing: ${r.renewal_error}` : ""}`;
    const left = r.expires_at - now;
    const text = left <= 0 ? "EXPIRED" : `expires in ${ago(left)}`;
    const due = r.renewal_due_at <= now ? " · renewal due" : "";
    return `${text}${due}${r.renewal_error ? ` · renewal failing: ${r.renewal_error}` : ""}`;
  };
  document.getElementById("revocation-cas").replaceChildren(...cas.map((ca) => {
    const all = el("button", { "data-action": "revoke-all", "data-ca": ca, onclick: () => revokeAll(ca) }, "Revoke all…");
    return el("tr", { "data-ca": ca }, el("td", {}, ca), el("td", { "data-field": "revoked" }, revoked[ca] || 0),
      el("td", { "data-field": "responder" }, responderText(responders[ca])), el("td", {}, all));
  }));
  document.getElementById("crl-shards").replaceChildren(...revocation.shards.map((s) => {
    const state = s.crl_number === 0 ? badge("stale") : s.stale_since !== null ? badge("stale") : badge("ok");
    if (s.stale_since !== null) state.textContent = `waiting ${ago(now - s.stale_since)}`;
    else if (s.crl_number === 0) state.textContent = "none yet";
    else state.textContent = "current";
    return el("tr", { "data-ca": s.ca, "data-shard": s.shard }, el("td", {}, s.ca), el("td", {}, s.shard),
      el("td", { "data-field": "crl-number" }, s.crl_number),
      el("td", {}, s.this_update ? when(s.this_update) : "—"), el("td", {}, s.next_update ? new Date(s.next_update).toLocaleString() : "—"),
      el("td", {}, state), el("td", {}, s.made_by || "—"));
  }));
  document.getElementById("revoke-one").dataset.cached = revocation.cached_answers;
}

// Revoking every certificate of a CA cannot be undone: the operator types the CA's id.
async function revokeAll(ca) {
  const typed = window.prompt(`Revoke EVERY certificate ${ca} issued? Type ${ca} to confirm.`);
  if (typed === null) return;
  const shown = document.getElementById("lever-error");
  if (typed.trim() !== ca) {
    shown.textContent = `Revoke all of ${ca}: not confirmed (typed ${JSON.stringify(typed)})`;
    return;
  }
  const reason = document.getElementById("revoke-reason").value || "cessationOfOperation";
  try {
    const done = await api("POST", `/admin/v1/cas/${encodeURIComponent(ca)}/revoke-all`, { reason });
    document.getElementById("revoke-result").textContent = `${done.revoked} certificates of ${ca} revoked (${done.reason})`;
    shown.textContent = "";
    await refresh();
  } catch (e) {
    shown.textContent = `Revoke all of ${ca} failed: ${e.message}`;
  }
}

async function revokeOne() {
  const serial = document.getElementById("revoke-serial").value.trim();
  const reason = document.getElementById("revoke-reason").value;
  const result = document.getElementById("revoke-result");
  if (!serial) {
    result.textContent = "enter a serial";
    return;
  }
  if (!window.confirm(`Revoke certificate ${serial} (${reason})?`)) return;
  try {
    const done = await api("POST", `/admin/v1/certificates/${encodeURIComponent(serial)}/revoke`, { reason });
    result.textContent = `${done.serial} revoked at ${new Date(done.revoked_at).toLocaleString()} (${done.reason})` +
      (done.newly_revoked ? "" : " — it already was: the first revocation stands");
    await refresh();
  } catch (e) {
    result.textContent = `revoking ${serial} failed: ${e.message}`;
  }
}

async function refresh() {
  if (!state.token) {
    document.getElementById("login").style.display = "flex";
    return;
  }
  try {
    render(await api("GET", "/admin/v1/status"));
    document.getElementById("login").style.display = "none";
  } catch (e) {
    document.getElementById("error").textContent = e.message;
  }
}

reasonSelect(document.getElementById("revoke-reason"));
document.getElementById("revoke-button").addEventListener("click", revokeOne);
document.getElementById("sign-in").addEventListener("click", () => {
  state.token = document.getElementById("token").value.trim();
  sessionStorage.setItem("castellum-admin-token", state.token);
  refresh();
});
refresh();
setInterval(refresh, 1000);
