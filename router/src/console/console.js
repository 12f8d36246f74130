// The skiff console: fetches /api/view every second and draws it. No framework, nothing
// loaded from elsewhere; the router embeds this file.
"use strict";

const REFRESH_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";

function text(value) {
  return value === undefined || value === null ? "" : String(value);
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function rtt(micros) {
  if (!micros) return "";
  return micros >= 1000 ? `${(micros / 1000).toFixed(1)} ms` : `${micros} µs`;
}

// Fills table `id` with one row per item; each cell is [text, class].
function fill(id, items, cells) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...items.map((item) => {
    const row = document.createElement("tr");
    for (const [value, cls] of cells(item)) {
      const cell = document.createElement("td");
      cell.textContent = text(value);
      if (cls) cell.className = cls;
      row.append(cell);
    }
    return row;
  }));
  if (!items.length) {
    const row = document.createElement("tr");
    const cell = document.createElement("td");
    cell.colSpan = document.querySelectorAll(`#${id} th`).length;
    cell.className = "muted";
    cell.textContent = "none";
    row.append(cell);
    body.append(row);
  }
}

function svg(name, attributes, content) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (content !== undefined) node.textContent = content;
  return node;
}

// Sites on a circle, this site first; an edge per pair of sites that list each other, drawn
// with this site's own link state and RTT where it is one end.
function drawTopology(view) {
  const root = document.getElementById("topology");
  const sites = (view.network || []).map((s) => s.site);
  if (!sites.includes(view.site)) sites.unshift(view.site);
  const own = new Map((view.links || []).map((l) => [l.peer, l]));
  for (const peer of own.keys()) if (!sites.includes(peer)) sites.push(peer);
  const at = new Map();
  const [cx, cy, r] = [320, 180, sites.length > 1 ? 130 : 0];
  sites.forEach((site, i) => {
    const angle = (2 * Math.PI * i) / sites.length - Math.PI / 2;
    at.set(site, [cx + r * Math.cos(angle), cy + r * Math.sin(angle)]);
  });
  const nodes = [];
  const drawn = new Set();
  const edge = (a, b, state, label) => {
    const key = [a, b].sort().join("\u0000");
    if (drawn.has(key) || !at.has(a) || !at.has(b)) return;
    drawn.add(key);
    const [[x1, y1], [x2, y2]] = [at.get(a), at.get(b)];
    nodes.push(svg("line", { x1, y1, x2, y2, class: state, "data-link": key.replace("\u0000", "-") }));
    if (label) nodes.push(svg("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6, class: "rtt" }, label));
  };
  for (const [peer, link] of own) {
    edge(view.site, peer, link.status, `${link.status}${link.rttMicros ? " · " + rtt(link.rttMicros) : ""}`);
  }
  for (const s of view.network || []) {
    for (const l of s.links || []) edge(s.site, l.peer, "known", `cost ${l.cost}`);
  }
  const reachable = new Map((view.network || []).map((s) => [s.site, s.reachable]));
  const keys = new Map((view.network || []).map((s) => [s.site, s.routingKeys || []]));
  for (const site of sites) {
    const [x, y] = at.get(site);
    const cls = ["site", site === view.site ? "here" : "", reachable.get(site) === false ? "unreachable" : ""].join(" ");
    const group = svg("g", { class: cls, "data-site": site });
    group.append(svg("circle", { cx: x, cy: y, r: 30 }));
    group.append(svg("text", { x, y: y + 4, class: "name" }, site));
    const served = keys.get(site) || [];
    if (served.length) group.append(svg("text", { x, y: y + 46, class: "keys" }, served.join(", ")));
    nodes.push(group);
  }
  root.replaceChildren(...nodes);
}

function draw(view) {
  const status = view.status || {};
  document.getElementById("site").textContent = view.site;
  document.getElementById("summary").textContent =
    `data path: ${text(status.datapathSummary)} · acceleration: ${text(status.accelSummary)} · isolation: ${text(status.isolationSummary)} · ${text(status.activeConnections)} connections open`;
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  drawTopology(view);
  fill("links", view.links || [], (l) => [
    [l.name], [l.peer], [l.direction], [l.status, l.status], [rtt(l.rttMicros)],
    [l.streams], [bytes(l.bytesIn)], [bytes(l.bytesOut)],
  ]);
  const services = [
    ...(view.listeners || []).map((l) => ["listener", l.name, l.routingKey, `${l.host}:${l.port}`, l.reachable ? "reachable" : "no connector reachable", l.reachable ? "up" : "down"]),
    ...(view.connectors || []).map((c) => ["connector", c.name, c.routingKey, `${c.host}:${c.port}`, c.tls ? "tls" : "", ""]),
  ];
  fill("services", services, (s) => [[s[0]], [s[1]], [s[2]], [s[3]], [s[4], s[5]]]);
  const flows = (view.flows || []).slice(-50).reverse();
  fill("flows", flows, (f) => [
    [new Date(f.endMs).toLocaleTimeString()], [f.role], [f.routingKey], [`${f.origin} → ${f.dest}`],
    [`${bytes(f.bytesToBackend)} / ${bytes(f.bytesToClient)}`], [f.failure || f.outcome, f.outcome],
  ]);
  const isolation = (status.isolation && status.isolation.deniedByNamespace) || {};
  const policy = (view.policy && view.policy.denials) || {};
  const denials = [
    ...Object.entries(isolation).map(([ns, n]) => ["connect() refused in the kernel", `namespace ${ns}`, n]),
    ...Object.entries(policy).map(([control, n]) => ["site policy", control, n]),
  ];
  fill("denials", denials, (d) => [[d[0], "denied"], [d[1]], [d[2]]]);
  fill("certificates", view.certificates || [], (c) => [
    [c.certificate], [c.expiresAt ? new Date(c.expiresAt * 1000).toISOString().slice(0, 10) : "unknown"],
  ]);
}

async function refresh() {
  try {
    const answer = await fetch("/api/view", { credentials: "same-origin", cache: "no-store" });
    if (!answer.ok) throw new Error(`${answer.status} ${await answer.text()}`);
    draw(await answer.json());
  } catch (e) {
    document.getElementById("updated").textContent = `the router did not answer: ${e.message}`;
  }
  setTimeout(refresh, REFRESH_MS);
}

refresh();
