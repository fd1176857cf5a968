// omoi console: a client of the console's own HTTP/JSON API. Every page is
// drawn from DOM nodes (never from HTML strings), so nothing an agent or a
// ticket says can become markup. The bearer token lives in sessionStorage and
// travels in the Authorization header only, never in a URL or a cookie.
"use strict";

const TOKEN_KEY = "omoi.token";
const BOARD_SIZE = 200; // tickets on the board, newest first

// ---------- small helpers ----------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

// "TICKET_STATUS_IN_PROGRESS" -> "in_progress"
const short = (value, prefix) => (value || "").replace(prefix, "").toLowerCase();
const ticketStatus = (t) => short(t.status, "TICKET_STATUS_");
const taskStatus = (t) => short(t.status, "TASK_STATUS_");
const phaseName = (p) => { const n = short(p, "PHASE_"); return n === "unspecified" ? "" : n; };
const label = (x) => x.replace(/_/g, " ");

function usd(usage) {
  if (!usage || !usage.costUsd) return "";
  return "$" + Number(usage.costUsd).toFixed(4) + (usage.costEstimated ? " (est.)" : "");
}

function tokens(usage) {
  if (!usage) return "";
  const n = Number(usage.inputTokens || 0) + Number(usage.outputTokens || 0);
  return n ? n.toLocaleString() + " tok" : "";
}

function ago(ts) {
  if (!ts) return "";
  const secs = Math.max(0, Math.round((Date.now() - Date.parse(ts)) / 1000));
  if (secs < 60) return secs + " s ago";
  if (secs < 3600) return Math.round(secs / 60) + " min ago";
  return Math.round(secs / 3600) + " h ago";
}

function elapsed(task) {
  if (!task.startedAt) return "";
  const end = task.completedAt ? Date.parse(task.completedAt) : Date.now();
  return ((end - Date.parse(task.startedAt)) / 1000).toFixed(1) + " s";
}

function toast(text) {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 5000);
}

function setLive(on) {
  const el = document.getElementById("live");
  el.textContent = on ? "live" : "offline";
  el.classList.toggle("on", on);
}

// ---------- the API ----------

class Unauthenticated extends Error {}

function headers(extra) {
  const out = Object.assign({ Accept: "application/json" }, extra || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) out.Authorization = "Bearer " + token;
  return out;
}

async function api(method, path, body) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    setLive(false);
    throw e;
  }
  setLive(true);
  const text = await response.text();
  const json = text ? JSON.parse(text) : {};
  if (response.status === 401) {
    showLogin(json.message);
    throw new Unauthenticated(json.message || "unauthenticated");
  }
  if (!response.ok) throw new Error(json.message || response.statusText);
  return json;
}

// A server stream as Server-Sent Events, read with fetch so that the token
// goes in a header (EventSource cannot send one). Reconnects with
// Last-Event-ID when the connection drops; a stream the server ends is done.
function stream(path, onEvent, onEnd) {
  const abort = new AbortController();
  let lastId = null;
  const run = async () => {
    while (!abort.signal.aborted) {
      try {
        const extra = lastId ? { "Last-Event-ID": lastId } : {};
        const response = await fetch(path, { headers: headers(Object.assign({ Accept: "text/event-stream" }, extra)), signal: abort.signal });
        if (response.status === 401) { showLogin(); return; }
        if (!response.ok) throw new Error(response.statusText);
        setLive(true);
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) { if (onEnd) onEnd(); return; }
          buffer += value;
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let data = "", id = null, kind = "message";
            for (const line of block.split("\n")) {
              if (line.startsWith("data:")) data += line.slice(5).trimStart();
              else if (line.startsWith("id:")) id = line.slice(3).trim();
              else if (line.startsWith("event:")) kind = line.slice(6).trim();
            }
            if (!data) continue;
            if (id) lastId = id;
            const message = JSON.parse(data);
            if (kind === "error") toast(message.message || "stream error");
            else onEvent(message);
          }
        }
      } catch (e) {
        if (abort.signal.aborted) return;
        setLive(false);
        await new Promise((r) => setTimeout(r, 1000));
      }
    }
  };
  run();
  return () => abort.abort();
}

// A stream that does not end by itself: when the server ends it (a replica
// shutting down), it is opened again a second later.
function lasting(path, onEvent) {
  let stopped = false, stop = null, timer = null;
  const open = () => { stop = stream(path, onEvent, () => { if (!stopped) timer = setTimeout(open, 1000); }); };
  open();
  return () => { stopped = true; clearTimeout(timer); stop(); };
}

// Runs fn at most once per frame of `ms`, for bursts of events.
function coalesce(fn, ms) {
  let pending = false;
  return () => {
    if (pending) return;
    pending = true;
    setTimeout(() => { pending = false; fn(); }, ms);
  };
}

async function act(what, call) {
  try {
    await call();
    toast(what);
  } catch (e) {
    if (!(e instanceof Unauthenticated)) toast(what + " refused: " + e.message);
  }
}

// ---------- routing ----------

let cleanup = () => {};
const main = () => document.getElementById("main");

function navigate(path, replace) {
  if (replace) history.replaceState({}, "", path);
  else history.pushState({}, "", path);
  render();
}

function render() {
  cleanup();
  cleanup = () => {};
  const path = location.pathname;
  for (const id of ["nav-board", "nav-inbox", "nav-agents", "nav-queue", "nav-subscriptions"]) document.getElementById(id).classList.remove("active");
  const root = main();
  root.replaceChildren();
  let m;
  if (path === "/" || path === "/tickets") {
    document.getElementById("nav-board").classList.add("active");
    cleanup = boardPage(root);
  } else if ((m = path.match(/^\/tickets\/([^/]+)$/))) {
    document.getElementById("nav-board").classList.add("active");
    cleanup = ticketPage(root, decodeURIComponent(m[1]));
  } else if (path === "/inbox") {
    document.getElementById("nav-inbox").classList.add("active");
    cleanup = inboxPage(root);
  } else if (path === "/agents") {
    document.getElementById("nav-agents").classList.add("active");
    cleanup = agentsPage(root);
  } else if (path === "/subscriptions") {
    document.getElementById("nav-subscriptions").classList.add("active");
    cleanup = subscriptionsPage(root);
  } else if (path === "/queue") {
    document.getElementById("nav-queue").classList.add("active");
    cleanup = queuePage(root);
  } else {
    root.append(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "/", "data-nav": true }, "Back to the board")));
  }
}

function showLogin(message) {
  cleanup();
  cleanup = () => {};
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("logout").hidden = true;
  const root = main();
  const input = h("input", { type: "password", name: "token", autocomplete: "current-password", placeholder: "bearer token", required: true });
  const form = h("form", { class: "login", id: "login", onsubmit: (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value);
    document.getElementById("logout").hidden = false;
    render();
  } }, h("label", {}, "This mesh asks for its bearer token."), input, h("button", { class: "primary", type: "submit" }, "Log in"));
  root.replaceChildren(h("h1", {}, "Log in"), message ? h("p", { class: "error" }, message) : null, form);
  input.focus();
}

// ---------- board ----------

const COLUMNS = ["open", "in_progress", "awaiting_approval", "paused", "completed", "failed", "cancelled"];
const FINAL = new Set(["completed", "failed", "cancelled"]);

function progress(tasks) {
  const rank = (t) => PHASES.indexOf(phaseName(t.phase).toUpperCase());
  const order = tasks.slice().sort((a, b) => rank(a) - rank(b));
  return h("div", { class: "progress", title: order.map((t) => phaseName(t.phase) + ": " + taskStatus(t)).join(", ") },
    order.map((t) => h("span", { class: "s-" + taskStatus(t) })));
}

function card(ticket, tasks) {
  const done = tasks.filter((t) => taskStatus(t) === "completed").length;
  return h("a", { class: "card s-" + ticketStatus(ticket), href: "/tickets/" + ticket.id, "data-nav": true, "data-ticket": ticket.id },
    h("div", { class: "title" }, ticket.title),
    progress(tasks),
    h("div", { class: "meta" },
      tasks.length ? done + "/" + tasks.length + " tasks" : "",
      ticket.usage && ticket.usage.costUsd ? " · " + usd(ticket.usage) : "",
      ticket.branch ? " · " + ticket.branch : ""),
    ticket.pullRequestUrl ? h("div", { class: "meta" }, "PR: ", ticket.pullRequestUrl) : null);
}

function createForm() {
  const title = h("input", { name: "title", placeholder: "What should the agents do?", required: true, maxlength: 500 });
  const description = h("input", { name: "description", placeholder: "details (optional)" });
  const repository = h("input", { name: "repository", placeholder: "repository URL (optional)" });
  const baseRef = h("input", { name: "base_ref", placeholder: "base branch", size: 10 });
  const check = h("input", { name: "check_command", placeholder: "check, e.g. cargo test", size: 14 });
  const budget = h("input", { name: "max_cost_usd", type: "number", min: 0, step: "0.01", placeholder: "budget $", class: "budget" });
  const pull = h("input", { name: "pull_request", type: "checkbox" });
  const priority = h("select", { name: "priority" },
    ["MEDIUM", "LOW", "HIGH", "CRITICAL"].map((p) => h("option", { value: "TICKET_PRIORITY_" + p }, p.toLowerCase())));
  const submit = h("button", { class: "primary", type: "submit" }, "Create ticket");
  return h("form", { class: "create", id: "create-ticket", onsubmit: async (e) => {
    e.preventDefault();
    submit.disabled = true;
    const body = { title: title.value, description: description.value, priority: priority.value, requestId: crypto.randomUUID() };
    if (repository.value) body.repository = repository.value;
    if (baseRef.value) body.baseRef = baseRef.value;
    if (check.value) body.checkCommand = check.value;
    if (budget.value !== "") body.maxCostUsd = Number(budget.value);
    if (pull.checked) body.pullRequest = true;
    try {
      const created = await api("POST", "/v1/tickets", body);
      title.value = description.value = repository.value = baseRef.value = check.value = budget.value = "";
      pull.checked = false;
      toast("Ticket created: " + created.ticket.title);
    } catch (err) {
      if (!(err instanceof Unauthenticated)) toast("Not created: " + err.message);
    } finally {
      submit.disabled = false;
    }
  } }, title, description, repository, baseRef, check, h("label", {}, pull, " pull request"), budget, priority, submit);
}

function boardPage(root) {
  const columns = Object.fromEntries(COLUMNS.map((c) => [c, h("div", { class: "cards" })]));
  const known = new Map(); // ticket id -> { ticket, tasks }
  const newest = (a, b) => (Date.parse(b.ticket.createdAt) - Date.parse(a.ticket.createdAt)) || (a.ticket.id < b.ticket.id ? 1 : -1);
  const draw = coalesce(() => {
    for (const c of COLUMNS) columns[c].replaceChildren();
    for (const { ticket, tasks } of [...known.values()].sort(newest).slice(0, BOARD_SIZE)) {
      const column = columns[ticketStatus(ticket)];
      if (column) column.append(card(ticket, tasks));
    }
  }, 50);
  // The newest tickets, then each one again as it or its tasks change.
  const stop = lasting("/v1/tickets:watch?page_size=" + BOARD_SIZE, (m) => {
    if (m.ticket) known.set(m.ticket.id, { ticket: m.ticket, tasks: m.tasks || [] });
    draw();
  });
  root.append(
    h("h1", {}, "Tickets"),
    createForm(),
    h("div", { class: "board" }, COLUMNS.map((c) => h("section", { class: "column", "data-column": c }, h("h2", {}, label(c)), columns[c]))));
  return stop;
}

// ---------- ticket ----------

// Lays the tasks out by dependency depth: a column per depth, a row per task.
function dag(tasks, selected, onSelect) {
  const byId = new Map(tasks.map((t) => [t.id, t]));
  const depth = new Map();
  const depthOf = (t, seen = new Set()) => {
    if (depth.has(t.id)) return depth.get(t.id);
    if (seen.has(t.id)) return 0;
    seen.add(t.id);
    const d = Math.max(-1, ...(t.dependsOn || []).filter((d) => byId.has(d)).map((d) => depthOf(byId.get(d), seen))) + 1;
    depth.set(t.id, d);
    return d;
  };
  tasks.forEach((t) => depthOf(t));
  const columns = [];
  for (const t of tasks) (columns[depth.get(t.id)] ||= []).push(t);
  const W = 180, H = 46, GX = 36, GY = 18, PAD = 12;
  const at = new Map();
  columns.forEach((col, x) => col.forEach((t, y) => at.set(t.id, { x: PAD + x * (W + GX), y: PAD + y * (H + GY) })));
  const width = PAD * 2 + columns.length * (W + GX) - GX;
  const height = PAD * 2 + Math.max(1, ...columns.map((c) => c.length)) * (H + GY) - GY;
  const edges = [];
  for (const t of tasks) for (const d of t.dependsOn || []) {
    if (!at.has(d)) continue;
    const a = at.get(d), b = at.get(t.id);
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
    edges.push(s("path", { d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}` }));
  }
  const nodes = tasks.map((t) => {
    const p = at.get(t.id);
    const name = t.title.length > 26 ? t.title.slice(0, 25) + "…" : t.title;
    return s("g", { class: "node s-" + taskStatus(t) + (t.id === selected ? " selected" : ""), "data-task": t.id, "data-status": taskStatus(t), transform: `translate(${p.x},${p.y})`, onclick: () => onSelect(t.id) },
      s("title", {}, t.title + " — " + taskStatus(t)),
      s("rect", { width: W, height: H }),
      s("text", { x: 10, y: 19 }, name),
      s("text", { x: 10, y: 36, "font-size": 11 }, phaseName(t.phase) + " · " + label(taskStatus(t)) + (t.attempt > 1 ? " · #" + t.attempt : "")));
  });
  return h("div", { class: "dag", id: "dag" }, s("svg", { width, height, viewBox: `0 0 ${width} ${height}` }, edges, nodes));
}

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.filter(([, v]) => v !== "" && v !== undefined && v !== null).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

// A badge saying how often the guardian stepped into a task, and its last
// intervention on hover.
function guardianBadge(list) {
  if (!list || !list.length) return "";
  const last = list[list.length - 1];
  return h("span", { class: "badge guardian", title: "guardian: " + last.action + " — " + last.reason },
    "guardian ×" + list.length);
}

// Each intervention of the guardian on a task: its attempt, what it did,
// the signal and why.
function guardianFacts(list) {
  if (!list || !list.length) return "";
  return h("div", { id: "task-guardian" }, list.map((g) =>
    h("div", { class: "intervention", "data-action": g.action, "data-signal": g.signal },
      h("span", { class: "badge guardian" }, g.action), " attempt " + g.attempt + ", " + String(g.signal || "").replace(/_/g, " ") + ": " + g.reason)));
}

function eventLine(e) {
  let kind = short(e.kind, "AGENT_EVENT_KIND_");
  // What the guardian said on the run's output stands out.
  if (kind === "output" && /^guardian: /.test(e.text || "")) kind = "guardian";
  const parts = [];
  if (e.tool) parts.push(e.tool);
  if (e.path) parts.push(e.path);
  if (e.text) parts.push(e.text);
  if (e.exitCode !== undefined && e.exitCode !== null) parts.push("exit " + e.exitCode);
  if (kind === "usage" && e.usage) parts.push(tokens(e.usage) + " " + usd(e.usage));
  return h("div", { "data-kind": kind, "data-seq": e.seq }, h("span", { class: "kind k-" + kind, title: "attempt " + e.attempt + ", event " + e.seq }, e.attempt + "." + e.seq + " " + label(kind)), parts.join("  "));
}

// The task whose session `t` continues, if another: named by its record, or
// by the checkpoint it starts from (`<ticket>/<task>/<attempt>`).
function sessionSource(t) {
  const s = t.session;
  if (!s) return null;
  if (s.resumedFromTaskId) return s.resumedFromTaskId;
  const parts = (s.checkpoint || "").split("/");
  return parts.length === 3 && parts[1] !== t.id ? parts[1] : null;
}

// The tasks of `tasks` whose conversation `t` continues, oldest first.
function conversationOf(t, tasks) {
  const chain = [], seen = new Set([t.id]);
  for (let id = sessionSource(t); id && !seen.has(id); ) {
    const earlier = tasks.find((x) => x.id === id);
    if (!earlier) break;
    seen.add(id);
    chain.unshift(id);
    id = sessionSource(earlier);
  }
  return chain;
}

// The candidates a best-of-N task chooses among, side by side: each one's
// runner, model, check, change, cost and why it was or was not chosen,
// then each one's kept diff. `key` changes when any of that does.
// The step a task belongs to as best-of-N: the task choosing among the
// candidates (or a person's later choice of one), its candidates, people's
// choices, and the one whose change is on the branch now.
function candidateStep(t, tasks) {
  let chooserId = t.id;
  if (t.landsCandidate) {
    const landed = tasks.find((c) => c.id === (t.dependsOn || [])[0]);
    if (!landed) return null;
    chooserId = landed.candidateOf;
  }
  const chooser = tasks.find((c) => c.id === chooserId);
  const own = tasks.filter((c) => c.candidateOf === chooserId).sort((a, b) => a.candidate - b.candidate);
  if (!chooser || !own.length) return null;
  const ids = new Set(own.map((c) => c.id));
  const choices = tasks.filter((c) => c.landsCandidate && ids.has((c.dependsOn || [])[0]));
  const landings = [chooser, ...choices].filter((c) => taskStatus(c) === "completed" && (c.candidates || []).some((x) => x.chosen));
  landings.sort((a, b) => Date.parse(a.completedAt || 0) - Date.parse(b.completedAt || 0));
  const current = landings[landings.length - 1] || chooser;
  const underWay = choices.find((c) => !FINAL.has(taskStatus(c)) && taskStatus(c) !== "timed_out");
  return { chooser, own, current, underWay };
}

function candidatesView(t, tasks, showTask, choose) {
  const step = candidateStep(t, tasks);
  if (!step) return { key: "", nodes: [] };
  const seen = new Map((step.current.candidates || []).map((c) => [c.index, c]));
  const decided = ["completed", "failed"].includes(taskStatus(step.chooser)) && !step.underWay;
  const rows = step.own.map((c) => {
    const kept = (c.result && c.result.candidate) || {};
    const s = seen.get(c.candidate) || {};
    const check = c.result && c.result.check;
    return {
      task: c, index: c.candidate, status: taskStatus(c),
      runner: s.runner || kept.runner || "", model: s.model || kept.model || "",
      check: check ? (check.passed ? "passed" : "failed") : c.result ? "no check" : "",
      change: kept.commit ? "+" + (kept.insertions || 0) + " −" + (kept.deletions || 0) + " in " + (kept.files_changed || 0) + " files" : c.result ? "no change" : "",
      cost: usd(c.usage) || "", chosen: !!s.chosen, reason: s.reason || "", patch: kept.patch || "",
      choosable: decided && !s.chosen && !!kept.commit && taskStatus(c) === "completed",
    };
  });
  const key = JSON.stringify([step.current.id, step.underWay && step.underWay.id,
    rows.map((r) => [r.index, r.status, r.check, r.change, r.cost, r.chosen, r.reason, r.choosable])]);
  const why = h("input", { id: "choice-comment", placeholder: "Why (recorded with the choice)", maxlength: "2000" });
  const nodes = [
    h("h2", {}, "Candidates"),
    step.current !== step.chooser ? h("p", { class: "muted", id: "chosen-by" }, "On the branch since ",
      h("a", { href: "#", onclick: (ev) => { ev.preventDefault(); showTask(step.current.id); } }, step.current.title), ".") : "",
    step.underWay ? h("p", { class: "muted", id: "choice-under-way" }, "Landing: ",
      h("a", { href: "#", onclick: (ev) => { ev.preventDefault(); showTask(step.underWay.id); } }, step.underWay.title), "…") : "",
    h("table", { id: "candidates" },
      h("tr", {}, ["#", "status", "runner", "model", "check", "change", "cost", "choice"].map((x) => h("th", {}, x))),
      rows.map((r) => h("tr", { "data-candidate": r.index, class: r.chosen ? "chosen" : "" },
        h("td", {}, h("a", { href: "#", onclick: (ev) => { ev.preventDefault(); showTask(r.task.id); } }, String(r.index))),
        h("td", {}, h("span", { class: "badge s-" + r.status }, label(r.status))),
        h("td", {}, r.runner), h("td", {}, r.model), h("td", { class: "check" }, r.check), h("td", {}, r.change), h("td", {}, r.cost),
        h("td", { class: "reason" }, h("span", { class: "why" }, r.chosen ? h("strong", {}, r.reason) : r.reason),
          r.choosable ? h("div", {}, h("button", { class: "choose", title: "Land candidate " + r.index + " in place of the one on the branch",
            onclick: () => choose(step.chooser.id, r.index, why.value.trim()) }, "Land this one")) : "")))),
    rows.some((r) => r.choosable) ? h("p", { class: "choice" }, why) : "",
    h("div", { class: "side-by-side" }, rows.map((r) => h("div", { class: "candidate-diff", "data-candidate": r.index },
      h("h3", {}, "Candidate " + r.index + (r.runner ? " · " + r.runner : "") + (r.chosen ? " · chosen" : "")),
      r.patch ? diffView(r.patch) : h("p", { class: "muted" }, r.task.result ? "No change kept." : "Not done yet.")))),
  ];
  return { key, nodes };
}

// What the ticket's check said of a completed task's work: verdict, exit
// status, time, and (when it failed) the output's last lines.
function checkFacts(t) {
  const c = t.result && t.result.check;
  if (!c) return "";
  const how = c.timed_out ? "killed at its time limit" : c.exit_code !== undefined && c.exit_code !== null ? "exit " + c.exit_code : "did not finish";
  const verdict = h("span", { class: "badge s-" + (c.passed ? "completed" : "failed"), id: "task-check" }, c.passed ? "passed" : "failed");
  const parts = [verdict, " ", h("code", {}, c.command), " (" + how + ", " + (Number(c.duration_ms || 0) / 1000).toFixed(1) + " s)"];
  if (!c.passed && (c.output_tail || []).length) parts.push(h("pre", { class: "check-output" }, c.output_tail.join("\n")));
  return h("span", {}, parts);
}

// A task's agent session: its runner and id, its latest checkpoint, and
// where it was resumed from (a follow-up's source task is a link).
function sessionFacts(t, showTask) {
  const s = t.session;
  const parts = [h("span", { id: "task-session" }, (s.runner || "") + " " + (s.sessionId || "(no id)"))];
  if (s.checkpoint) {
    const kib = Math.max(1, Math.round(Number(s.checkpointBytes || 0) / 1024));
    const n = s.checkpoints || 0;
    parts.push(" · " + n + (n === 1 ? " checkpoint" : " checkpoints") + " of attempt " + (s.attempt || 0) + ", last " +
      (s.checkpointAt ? ago(s.checkpointAt) : "") + " (" + kib + " KiB)");
  }
  if (s.resumedFromAttempt) parts.push(" · resumed from attempt " + s.resumedFromAttempt);
  const source = sessionSource(t);
  if (source) {
    parts.push(" · continues the session of ", h("a", { href: "#", class: "resumed-from", onclick: (ev) => { ev.preventDefault(); showTask(source); } },
      "task " + source.slice(0, 8)));
  }
  return h("span", {}, ...parts);
}

function ticketPage(root, id) {
  let selected = null, ticket = null, tasks = [], reactions = [];
  // The guardian's interventions on each task (TASK_GUARDIAN_INTERVENED of
  // the ticket's events), by task id, each once.
  const interventions = new Map(), heard = new Set();
  const noteIntervention = (e) => {
    if (!e || e.eventType !== "TASK_GUARDIAN_INTERVENED" || heard.has(e.id)) return;
    heard.add(e.id);
    interventions.set(e.entityId, (interventions.get(e.entityId) || []).concat([e.payload || {}]));
  };
  let stopOutput = () => {};
  let outputFor = null, endedAttempt = null;
  const header = h("div");
  // Made once: the page redraws on every event, and a message being
  // typed must survive that.
  const followUp = h("form", { id: "follow-up", class: "follow-up", onsubmit: (ev) => {
    ev.preventDefault();
    const message = followUp.message.value.trim();
    if (!message) return;
    act("Follow-up asked", () => api("POST", "/v1/tickets/" + encodeURIComponent(id) + ":followUp", { message }))
      .then(() => { followUp.reset(); load(); });
  } },
  h("textarea", { name: "message", rows: "2", placeholder: "Ask the agent that did this for more: a follow-up resumes its session" }),
  h("button", { type: "submit" }, "Follow up"));
  const graph = h("div");
  const table = h("div");
  const detail = h("div", { id: "task-detail" });
  const gates = h("div", { id: "gates" });
  const whole = h("div", { id: "branch-diff" });
  let wholeAt = null;
  // Made once per phase, as the follow-up's: a comment being typed
  // survives redraws.
  const decide = decisionForms(() => load());

  const showTask = (taskId) => {
    selected = taskId;
    draw();
  };

  const drawDetail = () => {
    const t = tasks.find((x) => x.id === selected);
    if (!t) { detail.replaceChildren(h("p", { class: "muted" }, "Select a task to see its agent's work.")); return; }
    // A new attempt of a task whose stream had ended (a retry) is followed
    // again, from its history.
    if (outputFor !== t.id || (endedAttempt !== null && t.attempt > endedAttempt)) {
      stopOutput();
      outputFor = t.id;
      endedAttempt = null;
      const log = h("div", { class: "events", id: "events" });
      const ended = h("p", { class: "muted", id: "events-end" });
      detail.replaceChildren(h("h2", {}, t.title), h("div", { id: "task-facts" }), h("div", { class: "actions", id: "task-actions" }),
        h("div", { id: "task-candidates" }), h("div", { id: "task-diff" }), h("h2", {}, "Agent events"), log, ended);
      const onEvent = (m) => {
        if (!m.event) return;
        const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
        log.append(eventLine(m.event));
        if (stick) log.scrollTop = log.scrollHeight;
      };
      // The whole conversation: the events of the tasks whose session this
      // one continues (a follow-up's), oldest first, then its own, live.
      const chain = conversationOf(t, tasks);
      let stopped = false, stopPart = () => {};
      const part = (i) => {
        if (stopped) return;
        const own = i >= chain.length;
        const id = own ? t.id : chain[i];
        if (chain.length) {
          log.append(h("div", { class: "conversation-part", "data-task": id },
            own ? "— this task —" : "— earlier in this conversation: " + ((tasks.find((x) => x.id === id) || {}).title || id) + " —"));
        }
        stopPart = stream("/v1/tasks/" + encodeURIComponent(id) + "/output" + (own ? "?follow=true" : ""), onEvent, own
          ? () => { ended.textContent = "The task has ended."; endedAttempt = t.attempt; reload(); }
          : () => part(i + 1));
      };
      part(0);
      stopOutput = () => { stopped = true; stopPart(); };
    }
    const g = t.git || {};
    detail.querySelector("#task-facts").replaceChildren(facts([
      ["status", h("span", { class: "badge s-" + taskStatus(t), id: "task-status" }, label(taskStatus(t)))],
      ["phase", phaseName(t.phase)],
      ["attempt", t.attempt + " (retries " + t.retryCount + "/" + t.maxRetries + ")"],
      ["agent", t.assignedAgentId || ""],
      ["requires", labelsText(t.requires)],
      ["started", t.startedAt ? ago(t.startedAt) : ""],
      ["elapsed", elapsed(t)],
      ["usage", [tokens(t.usage), usd(t.usage), t.usage && t.usage.model].filter(Boolean).join(" · ")],
      ["commit", g.commit ? g.commit.slice(0, 12) + " (+" + g.insertions + " −" + g.deletions + ", " + g.filesChanged + " files)" : ""],
      ["session", t.session ? sessionFacts(t, showTask) : ""],
      ["check", checkFacts(t)],
      ["guardian", guardianFacts(interventions.get(t.id))],
      ["error", t.errorMessage || ""],
    ]));
    // The change its attempt committed, once (it stays as it is).
    const changes = detail.querySelector("#task-diff");
    if (g.patch && changes.dataset.commit !== g.commit) {
      changes.dataset.commit = g.commit;
      changes.replaceChildren(h("h2", {}, "Changes"), diffView(g.patch));
    }
    // A candidate's work is kept, not pushed: its diff is in its result.
    const kept = t.result && t.result.candidate;
    if (!g.patch && kept && kept.patch && changes.dataset.commit !== kept.commit) {
      changes.dataset.commit = kept.commit;
      changes.replaceChildren(h("h2", {}, "Changes (kept for the choice, not pushed)"), diffView(kept.patch));
    }
    // The candidates a best-of-N task chooses among, redrawn when they move.
    const choose = (chooserId, candidate, comment) =>
      act("Candidate " + candidate + " chosen", () => api("POST", "/v1/tasks/" + encodeURIComponent(chooserId) + ":chooseCandidate", { candidate, comment }))
        .then(load);
    const view = candidatesView(t, tasks, showTask, choose);
    const candidates = detail.querySelector("#task-candidates");
    if (candidates.dataset.key !== view.key) {
      candidates.dataset.key = view.key;
      candidates.replaceChildren(...view.nodes);
    }
    const status = taskStatus(t);
    detail.querySelector("#task-actions").replaceChildren(
      h("button", { id: "retry-task", disabled: !["failed", "cancelled", "timed_out"].includes(status), onclick: () =>
        act("Task retried", () => api("POST", "/v1/tasks/" + encodeURIComponent(t.id) + ":retry", { reason: "retried from the console" })).then(load) }, "Retry task"),
      h("button", { id: "cancel-task", disabled: FINAL.has(status) || status === "timed_out", onclick: () =>
        act("Task cancelled", () => api("POST", "/v1/tasks/" + encodeURIComponent(t.id) + ":cancel", { reason: "cancelled from the console" })).then(load) }, "Cancel task"));
  };

  const draw = () => {
    if (!ticket) return;
    const st = ticketStatus(ticket);
    header.replaceChildren(
      h("h1", {}, ticket.title, " ", h("span", { class: "badge s-" + st, id: "ticket-status" }, label(st))),
      facts([
        ["id", ticket.id],
        ["description", ticket.description],
        ["repository", ticket.repository],
        ["branch", ticket.branch],
        ["check", ticket.checkCommand ? h("code", {}, ticket.checkCommand) : ""],
        ["head", ticket.headCommit ? ticket.headCommit.slice(0, 12) : ""],
        ["pull request", ticket.pullRequestUrl && /^https:\/\//.test(ticket.pullRequestUrl)
          ? h("a", { href: ticket.pullRequestUrl, rel: "noopener noreferrer", target: "_blank", id: "pull-request" }, ticket.pullRequestUrl)
          : ticket.pullRequestError || ""],
        ["usage", [tokens(ticket.usage), usd(ticket.usage)].filter(Boolean).join(" · ")],
        ["budget", ticket.maxCostUsd !== undefined && ticket.maxCostUsd !== null ? h("span", { id: "budget" }, "$" + Number(ticket.maxCostUsd).toFixed(2)) : ""],
        ["paused", ticket.pausedReason],
        ["from", ticket.source && /^https:\/\//.test(ticket.source.url)
          ? h("a", { href: ticket.source.url, rel: "noopener noreferrer", target: "_blank", id: "source" }, ticket.source.url)
          : ""],
        ["reactions", ticket.pullRequestUrl
          ? h("span", { id: "reactions" }, (ticket.reactions || 0) + " of " + (ticket.maxReactions || 0) + " used")
          : ""],
      ]),
      h("div", { class: "actions" },
        h("button", { id: "retry-ticket", disabled: !["failed", "cancelled"].includes(st), onclick: () =>
          act("Ticket retried", () => api("POST", "/v1/tickets/" + encodeURIComponent(id) + ":retry", { reason: "retried from the console" })).then(load) }, "Retry ticket"),
        h("button", { id: "cancel-ticket", disabled: FINAL.has(st), onclick: () =>
          act("Ticket cancelled", () => api("POST", "/v1/tickets/" + encodeURIComponent(id) + ":cancel", { reason: "cancelled from the console" })).then(load) }, "Cancel ticket")),
      followUp);
    followUp.querySelector("button").disabled = st === "cancelled";
    // The ticket's whole change: the branch against its base, as the
    // last task that landed work left it (redrawn only when that moves).
    const landed = tasks.filter((t) => t.git && t.git.branchDiff && t.completedAt)
      .sort((a, b) => Date.parse(b.completedAt) - Date.parse(a.completedAt))[0];
    if (landed && wholeAt !== landed.git.commit) {
      wholeAt = landed.git.commit;
      const d = landed.git.branchDiff;
      whole.replaceChildren(
        h("details", { class: "branch", open: "" },
          h("summary", {}, h("h2", {}, "The whole change"), " ",
            h("span", { class: "muted" }, ticket.branch + " against its base (from " + (d.mergeBase || "").slice(0, 10) + "): " +
              (d.filesChanged || 0) + " files, +" + (d.insertions || 0) + " −" + (d.deletions || 0) +
              (d.patchTruncated ? " (cut: git diff " + (d.mergeBase || "").slice(0, 10) + " " + landed.git.commit.slice(0, 10) + " has all of it)" : ""))),
          diffView(d.patch)));
    }
    gates.replaceChildren(...(ticket.gates || []).length ? [h("h2", {}, "Approvals"),
      ...ticket.gates.map((g) => gateView(g, tasks, gateState(g) === "awaiting_approval" ? decide(id, g.phase) : null))] : []);
    graph.replaceChildren(h("h2", {}, "Tasks"), dag(tasks, selected, showTask));
    table.replaceChildren(h("table", { id: "tasks" },
      h("tr", {}, ["task", "phase", "status", "attempt", "agent", "elapsed", "usage", "commit"].map((c) => h("th", {}, c))),
      tasks.map((t) => h("tr", { class: "clickable" + (t.id === selected ? " selected" : ""), "data-task": t.id, onclick: () => showTask(t.id) },
        h("td", {}, t.title), h("td", {}, phaseName(t.phase)),
        h("td", {}, h("span", { class: "badge s-" + taskStatus(t) }, label(taskStatus(t))), guardianBadge(interventions.get(t.id))),
        h("td", {}, t.attempt), h("td", { class: "muted" }, (t.assignedAgentId || "").slice(0, 8)),
        h("td", {}, elapsed(t)), h("td", {}, [tokens(t.usage), usd(t.usage)].filter(Boolean).join(" · ")),
        h("td", {}, t.git && t.git.commit ? t.git.commit.slice(0, 10) : "")))),
      ...(reactions.length ? [h("h2", {}, "Reactions"), h("table", { id: "reactions-made" },
        h("tr", {}, ["kind", "caused by", "task", "status", "usage"].map((c) => h("th", {}, c))),
        reactions.map((r) => {
          const t = tasks.find((x) => x.id === r.taskId);
          return h("tr", { class: "clickable", onclick: () => showTask(r.taskId) },
            h("td", {}, r.kind.replace("_", " ")),
            h("td", {}, /^https:\/\//.test(r.url) ? h("a", { href: r.url, rel: "noopener noreferrer", target: "_blank" }, r.url) : r.url),
            h("td", {}, t ? t.title : r.taskId.slice(0, 8)),
            h("td", {}, t ? h("span", { class: "badge s-" + taskStatus(t) }, label(taskStatus(t))) : ""),
            h("td", {}, t ? [tokens(t.usage), usd(t.usage)].filter(Boolean).join(" · ") : ""));
        }))] : []));
    drawDetail();
  };

  const load = async () => {
    try {
      const got = await api("GET", "/v1/tickets/" + encodeURIComponent(id));
      ticket = got.ticket;
      tasks = got.tasks || [];
      reactions = got.reactions || [];
      watched();
      if (!selected) {
        const running = tasks.find((t) => taskStatus(t) === "running");
        if (running) selected = running.id;
      }
      draw();
    } catch (e) {
      if (!(e instanceof Unauthenticated)) root.replaceChildren(h("h1", {}, "Ticket"), h("p", { class: "error" }, e.message));
    }
  };
  let watched = () => {};
  const reload = coalesce(load, 150);
  root.append(header, gates, whole, h("div", { class: "split" }, h("div", {}, graph, table), detail));
  load();
  // The ticket's events, history then live; each one redraws from GetTicket.
  // The stream ends with the ticket; timers keep elapsed times moving.
  // The stream ends with the ticket; a ticket that comes back (a retry)
  // is watched again.
  let stopWatch = null;
  const watch = () => {
    stopWatch = stream("/v1/tickets/" + encodeURIComponent(id) + ":watch", (e) => { noteIntervention(e); reload(); },
      () => { stopWatch = null; reload(); });
  };
  watched = () => { if (!stopWatch && ticket && !FINAL.has(ticketStatus(ticket))) watch(); };
  watch();
  const clock = setInterval(() => { if (tasks.some((t) => taskStatus(t) === "running")) drawDetail(); }, 1000);
  return () => { if (stopWatch) stopWatch(); stopOutput(); clearInterval(clock); };
}

// ---------- people: approvals, the inbox, diffs ----------

const gateState = (g) => short(g.state, "GATE_STATE_");

// A unified diff, a collapsible block per file with its +/- counts; large
// files start collapsed.
function diffView(patch) {
  const files = [];
  for (const line of (patch || "").split("\n")) {
    if (line.startsWith("diff --git ")) {
      files.push({ name: line.replace(/^diff --git a\/(.*) b\/.*$/, "$1"), lines: [], add: 0, del: 0 });
      continue;
    }
    const f = files[files.length - 1];
    if (!f) continue;
    if (line.startsWith("+++ ") || line.startsWith("--- ") || /^(index|new file|deleted file|similarity|rename) /.test(line)) continue;
    if (line.startsWith("+")) f.add++;
    else if (line.startsWith("-")) f.del++;
    f.lines.push(line);
  }
  if (!files.length) return h("p", { class: "muted" }, "No change.");
  return h("div", { class: "diffs" }, files.map((f) => h("details", { class: "diff", open: f.lines.length <= 200 ? "" : null, "data-file": f.name },
    h("summary", {}, f.name, " ", h("span", { class: "add" }, "+" + f.add), " ", h("span", { class: "del" }, "−" + f.del)),
    h("pre", {}, f.lines.map((l) => h("span", { class: l.startsWith("@@") ? "l-hunk" : l.startsWith("+") ? "l-add" : l.startsWith("-") ? "l-del" : "" }, l))))));
}

// Approve, or ask for changes, with a comment.
function decisionForm(ticketId, phase, after) {
  const base = "/v1/tickets/" + encodeURIComponent(ticketId);
  const comment = h("textarea", { name: "comment", rows: "3", placeholder: "A comment: the agents of the next phase are told it; asking for changes, say what to change" });
  const form = h("form", { class: "decide", "data-ticket": ticketId, "data-phase": phaseName(phase), onsubmit: (e) => e.preventDefault() },
    comment,
    h("button", { class: "primary", type: "button", "data-action": "approve", onclick: () =>
      act("Approved", () => api("POST", base + ":approve", { comment: comment.value.trim(), phase })).then(() => { comment.value = ""; after(); }) }, "Approve"),
    h("button", { type: "button", "data-action": "request-changes", onclick: () => {
      if (!comment.value.trim()) { toast("Say what to change in the comment."); return; }
      act("Changes requested", () => api("POST", base + ":requestChanges", { comment: comment.value.trim(), phase })).then(() => { comment.value = ""; after(); });
    } }, "Request changes"));
  return form;
}

// The decision forms of a page, each made once per ticket and phase and
// kept, so that a comment being typed survives the page's redraws.
function decisionForms(after) {
  const forms = new Map();
  return (ticketId, phase) => {
    const key = ticketId + "/" + phase;
    if (!forms.has(key)) forms.set(key, decisionForm(ticketId, phase, after));
    return forms.get(key);
  };
}

// A gate: its state, what it asks to approve (each task's summary and
// diff), and, when it awaits a person, the decision form.
function gateView(g, tasks, form) {
  const st = gateState(g);
  const reviewed = (g.reviewTaskIds || []).map((id) => tasks.find((t) => t.id === id)).filter(Boolean);
  const said = (t) => ((t.result || {}).summary || "");
  return h("div", { class: "gate s-" + st, "data-phase": phaseName(g.phase) },
    h("h3", {}, "The " + phaseName(g.phase) + " phase ", h("span", { class: "badge s-" + st }, label(st))),
    facts([
      ["asked", g.rounds ? g.rounds + (g.rounds === 1 ? " time" : " times") + (g.requestedAt ? ", last " + ago(g.requestedAt) : "") : ""],
      ["decided", g.decidedBy ? g.decidedBy + (g.decidedAt ? ", " + ago(g.decidedAt) : "") : ""],
      ["comment", g.comment || ""],
      ["changes asked", (g.changeRequests || []).map((c) => c.comment).join(" · ")],
    ]),
    st === "awaiting_approval" ? reviewed.map((t) => h("div", { class: "reviewed", "data-task": t.id },
      h("h4", {}, t.title, " ", h("span", { class: "muted" }, phaseName(t.phase))),
      said(t) ? h("div", { class: "summary" }, said(t)) : null,
      diffView(t.git && t.git.patch))) : null,
    form);
}

function inboxPage(root) {
  const body = h("div", { id: "inbox" }, h("p", { class: "muted" }, "Loading…"));
  root.append(h("h1", {}, "Inbox"), h("p", { class: "muted" }, "Tickets waiting for a person: phases to approve, and paused tickets."), body);
  // A comment being typed survives the page's redraws.
  const formFor = decisionForms(() => load());
  const load = async () => {
    try {
      const [awaiting, paused] = await Promise.all(["TICKET_STATUS_AWAITING_APPROVAL", "TICKET_STATUS_PAUSED"].map((st) =>
        api("GET", "/v1/tickets?page_size=200&status=" + st)));
      const tickets = [...(awaiting.tickets || []), ...(paused.tickets || [])];
      if (!tickets.length) { body.replaceChildren(h("p", { id: "inbox-empty" }, "Nothing waits for a person.")); return; }
      const items = await Promise.all(tickets.map(async (t) => {
        const full = (t.gates || []).some((g) => gateState(g) === "awaiting_approval")
          ? await api("GET", "/v1/tickets/" + encodeURIComponent(t.id)) : { ticket: t, tasks: [] };
        const ticket = full.ticket;
        return h("div", { class: "inbox-item", "data-ticket": ticket.id },
          h("h2", {}, h("a", { href: "/tickets/" + ticket.id, "data-nav": true }, ticket.title), " ",
            h("span", { class: "badge s-" + ticketStatus(ticket) }, label(ticketStatus(ticket)))),
          ticket.pausedReason ? h("p", {}, "Paused: " + ticket.pausedReason) : null,
          (ticket.gates || []).filter((g) => gateState(g) === "awaiting_approval")
            .map((g) => gateView(g, full.tasks || [], formFor(ticket.id, g.phase))));
      }));
      body.replaceChildren(...items);
    } catch (e) {
      if (!(e instanceof Unauthenticated)) body.replaceChildren(h("p", { class: "error" }, e.message));
    }
  };
  load();
  // Anything a person may be asked about changes the board's stream.
  const stop = lasting("/v1/tickets:watch?page_size=1", coalesce(load, 300));
  return stop;
}

// ---------- notifications ----------

const TICKET_EVENTS = ["TICKET_COMPLETED", "TICKET_FAILED", "TICKET_PAUSED", "TICKET_APPROVAL_REQUESTED",
  "TICKET_PULL_REQUEST_OPENED", "TICKET_CHANGES_REQUESTED", "TICKET_APPROVED", "TICKET_CANCELLED", "TICKET_CREATED",
  "TICKET_REOPENED", "TICKET_REACTION"];

function subscriptionsPage(root) {
  const list = h("div", { id: "subscriptions" });
  const log = h("div", { id: "deliveries" });
  let selected = null;
  const url = h("input", { name: "url", placeholder: "https://hooks.slack.com/services/… or your receiver", required: true });
  const secret = h("input", { name: "secret", type: "password", placeholder: "signing secret (16+ bytes)", required: true, autocomplete: "new-password" });
  const format = h("select", { name: "format" }, h("option", { value: "SUBSCRIPTION_FORMAT_JSON" }, "JSON"), h("option", { value: "SUBSCRIPTION_FORMAT_SLACK" }, "Slack"));
  const boxes = TICKET_EVENTS.map((t, i) => h("label", { class: "event-type" },
    h("input", { type: "checkbox", name: "event_types", value: t, checked: i < 4 }), " " + label(t.replace("TICKET_", "").toLowerCase())));
  const form = h("form", { class: "create", id: "subscribe", onsubmit: async (e) => {
    e.preventDefault();
    const eventTypes = boxes.map((b) => b.querySelector("input")).filter((c) => c.checked).map((c) => c.value);
    await act("Subscribed", () => api("POST", "/v1/subscriptions", { url: url.value.trim(), eventTypes, format: format.value, secret: secret.value }));
    secret.value = "";
    load();
  } }, url, format, secret, h("button", { class: "primary", type: "submit" }, "Subscribe"), h("div", { class: "event-types" }, boxes));
  const showLog = async (id) => {
    selected = id;
    try {
      const got = await api("GET", "/v1/subscriptions/" + encodeURIComponent(id) + "/deliveries?page_size=100");
      const rows = got.deliveries || [];
      log.replaceChildren(h("h2", {}, "Deliveries"), rows.length === 0 ? h("p", { class: "muted" }, "Nothing delivered yet.") :
        h("table", { id: "delivery-log" },
          h("tr", {}, ["event", "ticket", "state", "tries", "created"].map((c) => h("th", {}, c))),
          rows.map((d) => h("tr", { "data-event": d.eventId },
            h("td", {}, d.eventType),
            h("td", {}, d.ticketId ? h("a", { href: "/tickets/" + d.ticketId, "data-nav": true }, d.ticketId.slice(0, 8)) : ""),
            h("td", {}, h("span", { class: "badge s-" + short(d.state, "DELIVERY_STATE_") }, label(short(d.state, "DELIVERY_STATE_")))),
            h("td", { class: "tries" }, (d.attempts || []).map((a) => (a.statusCode || "—") + " " + a.latencyMs + " ms" + (a.error ? " (" + a.error + ")" : "")).join(" · ")),
            h("td", {}, ago(d.createdAt))))));
    } catch (e) {
      if (!(e instanceof Unauthenticated)) log.replaceChildren(h("p", { class: "error" }, e.message));
    }
  };
  const load = async () => {
    try {
      const got = await api("GET", "/v1/subscriptions");
      const subs = got.subscriptions || [];
      list.replaceChildren(subs.length === 0 ? h("p", { class: "muted", id: "no-subscriptions" }, "No subscriptions: nothing is sent anywhere.") :
        h("table", {},
          h("tr", {}, ["address", "format", "events", "since", ""].map((c) => h("th", {}, c))),
          subs.map((sub) => h("tr", { class: "clickable" + (sub.id === selected ? " selected" : ""), "data-subscription": sub.id, onclick: () => { showLog(sub.id); load(); } },
            h("td", {}, sub.url), h("td", {}, short(sub.format, "SUBSCRIPTION_FORMAT_")),
            h("td", {}, (sub.eventTypes || []).join(", ")), h("td", {}, ago(sub.createdAt)),
            h("td", {}, h("button", { onclick: (ev) => { ev.stopPropagation();
              act("Unsubscribed", () => api("DELETE", "/v1/subscriptions/" + encodeURIComponent(sub.id))).then(() => { if (selected === sub.id) { selected = null; log.replaceChildren(); } load(); }); } }, "Delete"))))));
    } catch (e) {
      if (!(e instanceof Unauthenticated)) list.replaceChildren(h("p", { class: "error" }, e.message));
    }
  };
  root.append(h("h1", {}, "Notifications"),
    h("p", { class: "muted" }, "Ticket events POSTed to your receivers, signed (X-Omoi-Signature-256), each once, retried for a day."),
    form, list, log);
  load();
  const timer = setInterval(() => { if (selected) showLog(selected); }, 2000);
  return () => clearInterval(timer);
}

// ---------- agents ----------

// `gpu=true, runner=codex`: an agent's labels or a task's requirement.
function labelsText(labels) {
  return Object.entries(labels || {}).sort(([a], [b]) => a.localeCompare(b)).map(([k, v]) => k + "=" + v).join(", ");
}

function agentsPage(root) {
  const body = h("div");
  root.append(h("h1", {}, "Agents"), body);
  let agents = null;
  const draw = () => {
    if (agents === null) return;
    body.replaceChildren(agents.length === 0 ? h("p", { class: "muted" }, "No agent is registered.") :
      h("table", { id: "agents" },
        h("tr", {}, ["agent", "type", "labels", "status", "heartbeat", "phases", "capacity", "running"].map((c) => h("th", {}, c))),
        agents.map((a) => {
          const st = short(a.status, "AGENT_STATUS_");
          const phases = (a.phases && a.phases.length ? a.phases : [a.phase]).map(phaseName).filter(Boolean);
          return h("tr", { "data-agent": a.id },
            h("td", {}, a.id), h("td", {}, a.agentType), h("td", { class: "labels" }, labelsText(a.labels)),
            h("td", {}, h("span", { class: "badge s-" + (st === "healthy" ? "completed" : st === "stale" ? "paused" : "cancelled") }, st)),
            h("td", {}, ago(a.lastHeartbeatAt)), h("td", {}, phases.join(", ") || "any"),
            h("td", {}, (a.runningTaskIds || []).length + " / " + a.capacity),
            h("td", {}, (a.runningTaskIds || []).map((t) => h("div", { class: "muted" }, t))));
        })));
  };
  // The list as the health service sends it on every change; the heartbeat
  // ages tick here.
  const stop = lasting("/v1/agents:watch", (m) => { agents = m.agents || []; draw(); });
  const clock = setInterval(draw, 1000);
  return () => { stop(); clearInterval(clock); };
}

// ---------- queue ----------

const PHASES = ["INITIAL", "IMPLEMENTATION", "INTEGRATION", "REFACTORING"];

function queuePage(root) {
  const counts = h("div");
  const pauses = h("div");
  const limits = h("div");
  let refresh = async () => {};
  const phase = h("select", { name: "phase" }, h("option", { value: "" }, "every phase"), PHASES.map((p) => h("option", { value: "PHASE_" + p }, p.toLowerCase())));
  const ticketId = h("input", { name: "ticket_id", placeholder: "ticket id (optional)" });
  const reason = h("input", { name: "reason", placeholder: "reason" });
  const pauseForm = h("form", { class: "create", id: "pause", onsubmit: (e) => {
    e.preventDefault();
    const body = { reason: reason.value };
    if (phase.value) body.phase = phase.value;
    if (ticketId.value) body.ticketId = ticketId.value;
    act("Dispatch paused", () => api("POST", "/v1/queue:pause", body)).then(() => { reason.value = ""; return refresh(); });
  } }, phase, ticketId, reason, h("button", { class: "primary", type: "submit" }, "Pause dispatch"));
  const key = h("input", { name: "key", placeholder: "concurrency key", required: true });
  const max = h("input", { name: "max_running", type: "number", min: 0, placeholder: "max running", required: true });
  const limitForm = h("form", { class: "create", id: "limit", onsubmit: (e) => {
    e.preventDefault();
    act("Limit set", () => api("PUT", "/v1/queue/limits/" + encodeURIComponent(key.value), { maxRunning: Number(max.value) })).then(refresh);
  } }, key, max, h("button", { type: "submit" }, "Set limit"));
  const unsatisfied = h("div");
  root.append(h("h1", {}, "Queue"), counts, unsatisfied, h("h2", {}, "Pauses"), pauseForm, pauses, h("h2", {}, "Concurrency limits"), limitForm, limits);
  const draw = (q) => {
    const statuses = ["pending", "assigned", "running", "completed", "failed", "cancelled", "timedOut"];
    const byPhase = new Map();
    for (const c of q.counts || []) {
      const p = phaseName(c.phase) || "none";
      if (!byPhase.has(p)) byPhase.set(p, {});
      byPhase.get(p)[short(c.status, "TASK_STATUS_")] = Number(c.count);
    }
    counts.replaceChildren(
      h("p", {}, "ready to dispatch: ", h("strong", { id: "ready" }, q.ready || "0")),
      h("table", { id: "depth" },
        h("tr", {}, h("th", {}, "phase"), statuses.map((st) => h("th", {}, label(st.replace("timedOut", "timed_out"))))),
        [...byPhase].map(([p, row]) => h("tr", {}, h("td", {}, p), statuses.map((st) => h("td", {}, row[st === "timedOut" ? "timed_out" : st] || 0)))),
        h("tr", {}, h("td", {}, h("strong", {}, "all")), statuses.map((st) => h("td", {}, h("strong", {}, q[st] || "0"))))));
    pauses.replaceChildren((q.pauses || []).length === 0 ? h("p", { class: "muted", id: "no-pauses" }, "Nothing is paused.") :
      h("table", { id: "pauses" }, h("tr", {}, ["phase", "ticket", "reason", "since", ""].map((c) => h("th", {}, c))),
        q.pauses.map((p) => h("tr", {},
          h("td", {}, phaseName(p.phase) || "every phase"), h("td", {}, p.ticketId || "every ticket"), h("td", {}, p.reason), h("td", {}, ago(p.pausedAt)),
          h("td", {}, h("button", { class: "resume", onclick: () => {
            const body = {};
            if (p.phase && p.phase !== "PHASE_UNSPECIFIED") body.phase = p.phase;
            if (p.ticketId) body.ticketId = p.ticketId;
            act("Dispatch resumed", () => api("POST", "/v1/queue:resume", body)).then(refresh);
          } }, "Resume"))))));
    // Work no registered agent can take: it waits for one with these labels.
    unsatisfied.replaceChildren(...((q.unsatisfied || []).length === 0 ? [] : [
      h("h2", {}, "Waiting for an agent"),
      h("table", { id: "unsatisfied" }, h("tr", {}, ["phase", "requires", "tasks"].map((c) => h("th", {}, c))),
        q.unsatisfied.map((u) => h("tr", {}, h("td", {}, phaseName(u.phase)), h("td", {}, labelsText(u.requires)), h("td", {}, u.tasks)))),
      h("p", { class: "muted" }, "No healthy agent taking the phase carries these labels: start an executor with them (OMOI_RUNNER, OMOI_AGENT_LABELS)."),
    ]));
    limits.replaceChildren((q.limits || []).length === 0 ? h("p", { class: "muted" }, "No limits.") :
      h("table", { id: "limits" }, h("tr", {}, ["key", "max running", "held now"].map((c) => h("th", {}, c))),
        q.limits.map((l) => h("tr", {}, h("td", {}, l.key), h("td", {}, l.maxRunning), h("td", {}, l.held || "0")))));
  };
  // After the page's own action, at once; otherwise as the queue sends them.
  refresh = async () => draw(await api("GET", "/v1/queue/stats"));
  return lasting("/v1/queue/stats:watch", (m) => draw(m.stats || {}));
}

// ---------- start ----------

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[data-nav]");
  if (!a || e.metaKey || e.ctrlKey || e.shiftKey || e.button !== 0) return;
  e.preventDefault();
  navigate(a.getAttribute("href"));
});
window.addEventListener("popstate", render);
document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("logout").hidden = !sessionStorage.getItem(TOKEN_KEY);
  document.getElementById("logout").addEventListener("click", () => showLogin());
  render();
});
