// hone's annotation page: shows one pair at a time, posts the answer with a
// client id of its own (a retry after a network failure reuses it, so the
// label is counted once), and fetches the next. Text from the server is only
// ever put in with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { pair: null, clientId: null, done: 0, busy: false };

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    let t = m[1];
    try { t = decodeURIComponent(t); } catch (e) { /* a stray %: take it as typed */ }
    sessionStorage.setItem("hone-token", t);
    history.replaceState(null, "", location.pathname);
  }
  return sessionStorage.getItem("hone-token") || "";
}

function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function api(path, options) {
  const r = await fetch(path, {
    ...options,
    headers: { "Authorization": "Bearer " + token(), "Content-Type": "application/json" },
  });
  const body = await r.json().catch(() => ({}));
  return { status: r.status, body };
}

function show(id, on) { $(id).hidden = !on; }

function progress(depth) {
  $("progress").textContent =
    `${state.done} labelled on this page · ${depth} awaiting labels`;
}

async function next() {
  if (!token()) { show("setup", true); show("task", false); return; }
  show("setup", false);
  let r;
  // One of the first 20 at random, so that people labelling at once are
  // seldom shown the same pair (the second answer to one would get 409).
  try { r = await api("/api/pairs?limit=20"); }
  catch (e) { $("message").textContent = "server unreachable; retrying"; return setTimeout(next, 2000); }
  if (r.status === 401) { sessionStorage.removeItem("hone-token"); $("message").textContent = r.body.error; return next(); }
  if (r.status !== 200) { $("message").textContent = r.body.error || ("error " + r.status); return setTimeout(next, 2000); }
  $("message").textContent = "";
  progress(r.body.queue_depth);
  const pairs = r.body.pairs;
  const pair = pairs[Math.floor(Math.random() * pairs.length)];
  if (!pair) {
    state.pair = null;
    show("task", false); show("idle", true);
    return setTimeout(next, 3000);
  }
  state.pair = pair;
  state.clientId = newId();
  $("prompt").textContent = pair.prompt;
  $("a").textContent = pair.a;
  $("b").textContent = pair.b;
  show("idle", false); show("task", true);
}

async function answer(choice) {
  if (!state.pair || state.busy) return;
  state.busy = true;
  const label = {
    client_id: state.clientId,
    item: state.pair.item,
    choice,
    annotator: $("annotator").value.trim() || "anonymous",
    time: Date.now() / 1000,
  };
  try {
    for (;;) {
      let r;
      try { r = await api("/api/labels", { method: "POST", body: JSON.stringify(label) }); }
      catch (e) { $("message").textContent = "not saved yet; retrying"; await new Promise((f) => setTimeout(f, 1500)); continue; }
      if (r.status === 200) { if (!r.body.duplicate) state.done += 1; break; }
      if (r.status === 409 || r.status === 404) { $("message").textContent = r.body.error; break; }
      $("message").textContent = r.body.error || ("error " + r.status);
      if (r.status === 401) { sessionStorage.removeItem("hone-token"); state.busy = false; return next(); }
      state.busy = false;
      return;
    }
  } finally { state.busy = false; }
  next();
}

document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
  const choice = { "1": "a", "2": "b", "t": "tie", "s": "skip" }[e.key];
  if (choice) { e.preventDefault(); answer(choice); }
});
for (const b of document.querySelectorAll("nav button")) {
  b.addEventListener("click", () => answer(b.dataset.choice));
}
$("save-token").addEventListener("click", () => {
  sessionStorage.setItem("hone-token", $("token").value.trim());
  next();
});
$("annotator").value = localStorage.getItem("hone-annotator") || "";
$("annotator").addEventListener("change", () => localStorage.setItem("hone-annotator", $("annotator").value.trim()));
next();
