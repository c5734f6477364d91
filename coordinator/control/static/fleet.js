// The fleet page: renders the coordinator's snapshot (GET api/fleet, then the
// server-sent events of api/events) without reloading. Everything shown is
// written as text, never as markup: names and messages come from registries
// and workers.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  let offset = 0;          // the coordinator's clock minus ours, seconds
  let lastNews = 0;        // Date.now() of the last event (fleet or tick)
  let source = null;       // the EventSource

  // ---- building nodes ------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const pill = (text, tone) => el("span", { class: "pill " + (tone || "") , text });
  const dot = (tone) => el("span", { class: "dot " + (tone || "") });
  const age = (at, prefix) => el("span", { class: "age", "data-at": at, "data-prefix": prefix || "" }, ago(at, prefix));

  function ago(at, prefix) {
    if (at === null || at === undefined) return "";
    const s = Math.max(0, Date.now() / 1000 + offset - at);
    let text;
    if (s < 2) text = "just now";
    else if (s < 60) text = Math.floor(s) + " s ago";
    else if (s < 3600) text = Math.floor(s / 60) + " min ago";
    else if (s < 86400) text = Math.floor(s / 3600) + " h ago";
    else text = Math.floor(s / 86400) + " d ago";
    return (prefix || "") + text;
  }

  function clock(at) {
    return new Date(at * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function fill(id, ...children) {
    $(id).replaceChildren(...children.flat().filter((c) => c));
  }

  // ---- the parts of the page -----------------------------------------------

  const HEALTH_TONE = { healthy: "ok", unprobed: "info", unhealthy: "warn", unreachable: "bad" };
  const STATE_TONE = { ready: "ok", progressing: "info", degraded: "warn", failing: "bad" };

  function tile(value, of, label, tone) {
    return el("div", { class: "tile " + (tone || "") },
      el("div", { class: "value" }, String(value), of !== null ? el("span", { class: "of", text: " / " + of }) : null),
      el("div", { class: "label", text: label }));
  }

  function renderTotals(t) {
    const share = (good, all) => (all === 0 ? "" : good === all ? "ok" : good === 0 ? "bad" : "warn");
    fill("totals",
      tile(t.healthy, t.instances, "healthy instances" + (t.draining ? ` · ${t.draining} draining` : ""),
        share(t.healthy, t.instances)),
      tile(t.models, null, t.models === 1 ? "model" : "models", ""),
      tile(t.in_flight, null, "in flight" + (t.waiting ? ` · ${t.waiting} waiting` : "") +
        (t.reporters ? ` · ${t.reporters} caller${t.reporters === 1 ? "" : "s"}` : ""), t.in_flight ? "info" : ""),
      tile(t.deployments_ready, t.deployments, "deployments ready", share(t.deployments_ready, t.deployments)),
      tile(t.running, null, "operations running" + (t.queued ? ` · ${t.queued} queued` : ""), t.running ? "info" : ""),
      tile(t.watchers_fresh, t.watchers, "watchers fresh", share(t.watchers_fresh, t.watchers)),
      tile(t.hosts_healthy, t.hosts, "worker managers", share(t.hosts_healthy, t.hosts)));
  }

  // The registry entry's last change: heartbeats that change nothing travel nowhere.
  const CHANGED = "When the registry entry last changed (a heartbeat that changes nothing is not passed on)";

  function instanceTable(instances, maxLoad, withLoad, runs) {
    const head = el("tr", {}, el("th", { text: "state" }), el("th", { text: "worker" }),
      withLoad ? el("th", { class: "right", text: "in flight" }) : null,
      withLoad ? el("th", { class: "right", text: "weight" }) : null,
      runs ? el("th", { text: "runs" }) : null,
      el("th", { class: "right", title: CHANGED, text: "entry changed" }));
    const rows = instances.map((i) => {
      const tone = HEALTH_TONE[i.health] || "";
      const bad = i.health === "unreachable" || i.health === "unhealthy";
      const width = maxLoad ? Math.round((100 * i.in_flight) / maxLoad) : 0;
      return el("tr", { class: bad ? "down" : "", "data-endpoint": i.endpoint, "data-health": i.health },
        el("td", {},
          el("span", { class: "state" }, dot(i.draining ? "warn" : tone), i.health,
            i.draining ? pill("draining", "warn") : null),
          i.why && bad ? el("div", { class: "why", text: i.why }) : null),
        el("td", { class: "mono", text: i.endpoint }),
        withLoad ? el("td", { class: "right" }, el("span", { class: "load" },
          el("span", { class: "bar" }, el("span", { style: null, "data-w": width })),
          el("span", { class: "num", text: String(i.in_flight) }))) : null,
        withLoad ? el("td", { class: "right num", text: fmtWeight(i.weight) }) : null,
        runs ? el("td", { class: "muted", text: (runs[i.endpoint] || []).join(", ") || "–" }) : null,
        el("td", { class: "right" }, i.last_heartbeat ? age(i.last_heartbeat) : el("span", { class: "faint", text: "–" })));
    });
    const table = el("table", {}, el("thead", {}, head), el("tbody", {}, rows));
    // Widths set through the DOM, not a style attribute (the page's CSP allows no inline style).
    table.querySelectorAll("[data-w]").forEach((bar) => { bar.style.width = bar.dataset.w + "%"; });
    return table;
  }

  function fmtWeight(w) {
    if (w === null || w === undefined) return "–";
    return Number.isInteger(w) ? String(w) : w.toFixed(2);
  }

  function renderModels(models) {
    const served = models.filter((m) => !m.service);
    const hosts = models.filter((m) => m.service);
    const maxLoad = Math.max(1, ...served.flatMap((m) => m.instances.map((i) => i.in_flight)));
    fill("models", served.length ? served.map((m) => {
      const tone = m.total === 0 ? "warn" : m.healthy === m.total ? "ok" : m.healthy === 0 ? "bad" : "warn";
      return el("div", { class: "card model", "data-key": m.key },
        el("div", { class: "card-head" },
          el("h3", { text: m.model }), pill(m.worker_type, ""),
          el("span", { class: "spacer" }),
          m.draining ? pill(`${m.draining} draining`, "warn") : null,
          m.waiting ? pill(`${m.waiting} waiting`, "info") : null,
          el("span", { class: "muted num", text: `${m.in_flight} in flight` }),
          pill(`${m.healthy} / ${m.total} healthy`, tone)),
        m.instances.length ? instanceTable(m.instances, maxLoad, true)
          : el("div", { class: "empty", text: "No instance (scaled to zero)." }));
    }) : el("div", { class: "card empty", text: "No model is registered yet." }));
    const runs = {};  // endpoint -> the models listed there
    for (const m of served) for (const i of m.instances) (runs[i.endpoint] = runs[i.endpoint] || []).push(m.model);
    fill("hosts", hosts.length ? el("div", { class: "card" }, instanceTable(hosts.flatMap((m) => m.instances), 1, false, runs))
      : el("div", { class: "card empty", text: "No worker manager is registered." }));
  }

  function renderDeployments(deployments) {
    fill("deployments", deployments.length ? deployments.map((d) => {
      const segments = [];
      const n = Math.max(d.replicas, d.ready);
      for (let k = 0; k < n; k++) segments.push(el("span", { class: k < Math.min(d.ready, d.replicas) ? "ready" : k >= d.replicas ? "extra" : "" }));
      return el("div", { class: "card deployment", "data-key": d.key, "data-ready": d.ready, "data-replicas": d.replicas },
        el("div", { class: "card-head" }, el("h3", { text: d.key }), el("span", { class: "spacer" }),
          pill(d.stuck ? "stuck" : d.state, d.stuck ? "bad" : STATE_TONE[d.state])),
        el("div", { class: "replicas" }, el("span", { class: "big ready-count", text: String(d.ready) }),
          el("span", { class: "muted", text: `of ${d.replicas} ready` }),
          el("span", { class: "spacer" }),
          el("span", { class: "faint", text: d.observed_generation < d.generation
            ? `generation ${d.generation} (applying)` : `generation ${d.generation}` })),
        n ? el("div", { class: "segments" }, segments) : null,
        d.last_error && d.state !== "ready" ? el("div", { class: "note bad", text: d.last_error }) : null,
        d.events.length ? el("ul", { class: "events" }, d.events.map((e) => el("li", {},
          el("span", { class: e.ok ? "mark-ok" : "mark-bad", text: e.ok ? "✓" : "✗" }),
          el("span", { class: "faint" }, age(e.at)),
          el("span", {}, el("span", { text: [e.action, e.endpoint].filter(Boolean).join(" ") }),
            el("div", { class: "reason", text: e.ok ? e.reason : (e.message || e.reason) }))))) : null);
    }) : el("div", { class: "card empty", text: "Nothing is deployed: the fleet is what the registries list." }));
  }

  function renderOperations(ops) {
    const rollouts = (ops.rollouts || []).filter((r) => r.phase !== "finished" && r.phase !== "stopped");
    const items = ops.running.map((o) => {
      const roll = rollouts.find((r) => r.key === o.key);
      return el("li", {}, dot("info"),
        el("div", { class: "grow" }, el("div", { class: "mono", text: o.key }),
          roll ? el("div", { class: "sub", text: `rolling: batch ${Math.min(roll.done + 1, roll.batches)} of ${roll.batches}, ${roll.phase}` +
            (roll.current.length ? ` (${roll.current.map((c) => c.join(":")).join(", ")})` : "") }) : null),
        o.queued ? pill(`${o.queued} queued`, "warn") : el("span", { class: "when", text: "running" }));
    });
    fill("operations", el("div", { class: "card" }, items.length ? el("ul", { class: "rows" }, items)
      : el("div", { class: "empty", text: "No operation running or queued." })));
  }

  function renderWatchers(watchers) {
    const tone = { fresh: "ok", stale: "bad", starting: "" };
    fill("watchers", el("div", { class: "card" }, watchers.length ? el("ul", { class: "rows" }, watchers.map((w) =>
      el("li", { "data-source": w.source, "data-state": w.state }, dot(tone[w.state]),
        el("div", { class: "grow" },
          el("div", {}, el("strong", { text: w.source }), " ", el("span", { class: "muted", text: w.kind })),
          el("div", { class: "sub", text: `version ${w.version} · ${w.instances} entries` +
            (w.refused ? ` · ${w.refused} refused` : "") + (w.failures ? ` · ${w.failures} failed in a row` : "") }),
          w.last_error && w.state === "stale" ? el("div", { class: "why", text: w.last_error }) : null),
        el("span", { class: "when" }, w.last_success ? age(w.last_success, "answered ") : w.state)))) : el("div", { class: "empty", text: "No watcher." })));
  }

  function renderErrors(errors) {
    fill("errors", el("div", { class: "card" }, errors.length ? el("ul", { class: "rows errors" }, errors.map((e) =>
      el("li", { class: e.at ? "" : "now" },
        el("div", { class: "grow" }, el("div", { class: "where", text: e.where }),
          el("div", { class: "message sub", text: e.message })),
        el("span", { class: "when" }, e.at ? age(e.at) : "now")))) : el("div", { class: "empty calm", text: "Nothing wrong." })));
  }

  function render(snapshot) {
    offset = snapshot.at - Date.now() / 1000;
    $("name").textContent = snapshot.name;
    $("namespace").textContent = snapshot.namespace ? "namespace " + snapshot.namespace : "";
    document.title = `Fleet · ${snapshot.name} · ${snapshot.totals.healthy}/${snapshot.totals.instances} healthy`;
    renderTotals(snapshot.totals);
    renderModels(snapshot.models);
    renderDeployments(snapshot.deployments);
    renderOperations(snapshot.operations);
    renderWatchers(snapshot.watchers);
    renderErrors(snapshot.errors);
    $("main").hidden = false;
    news(snapshot.at);
  }

  // ---- liveness ------------------------------------------------------------

  function news(at) {
    lastNews = Date.now();
    offset = at - Date.now() / 1000;
    setLive("on", "live · " + clock(at));
  }

  function setLive(state, text) {
    const live = $("live");
    live.className = "live " + state;
    live.dataset.state = state;
    $("live-text").textContent = text;
  }

  setInterval(() => {
    document.querySelectorAll(".age").forEach((node) => {
      node.textContent = ago(Number(node.dataset.at), node.dataset.prefix);
    });
    if (source && source.readyState === EventSource.OPEN && lastNews && Date.now() - lastNews > 12000) {
      setLive("quiet", `no news for ${Math.round((Date.now() - lastNews) / 1000)} s`);
    }
  }, 1000);

  // ---- connecting, and logging in -------------------------------------------

  async function start() {
    let answer;
    try {
      answer = await fetch("api/fleet", { credentials: "same-origin", cache: "no-store" });
    } catch (err) {
      setLive("off", "coordinator unreachable; trying again");
      setTimeout(start, 3000);
      return;
    }
    if (answer.status === 401) return askForKey();
    if (!answer.ok) {
      setLive("off", `coordinator answered ${answer.status}; trying again`);
      setTimeout(start, 3000);
      return;
    }
    render(await answer.json());
    follow();
  }

  function follow() {
    if (source) source.close();
    source = new EventSource("api/events");
    source.addEventListener("fleet", (event) => render(JSON.parse(event.data)));
    source.addEventListener("tick", (event) => news(JSON.parse(event.data).at));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (a 401 after the session ended, or no server): start again.
        source = null;
        setLive("off", "disconnected; trying again");
        setTimeout(start, 2000);
      } else {
        setLive("off", "reconnecting…");
      }
    });
  }

  function askForKey() {
    if (source) { source.close(); source = null; }
    setLive("off", "needs a key");
    $("login").hidden = false;
    $("key").focus();
  }

  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("login-error").textContent = "";
    const answer = await fetch("login", {
      method: "POST", credentials: "same-origin",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ key: $("key").value }),
    });
    if (!answer.ok) {
      $("login-error").textContent = answer.status === 401 ? "That key is not one of the gateway's keys." : `Refused (${answer.status}).`;
      return;
    }
    $("key").value = "";
    $("login").hidden = true;
    start();
  });

  start();
})();
