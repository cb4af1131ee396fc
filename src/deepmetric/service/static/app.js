// deepmetric gallery page: talks to this server's own API, nothing else.
"use strict";

const KEY_STORE = "deepmetric-api-key";
const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem(KEY_STORE) || "";
let health = null;
let thumbs = new Map(); // identity -> object URL of its thumbnail

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// One API call; a non-2xx answer becomes an ApiError carrying the server's words.
async function api(method, path, body) {
  const headers = {};
  if (apiKey) headers["X-API-Key"] = apiKey;
  let response;
  try {
    response = await fetch(path, { method, headers, body });
  } catch (e) {
    throw new ApiError(0, "the server cannot be reached (" + e.message + ")");
  }
  if (response.ok) return response;
  let message = response.status + " " + response.statusText;
  try {
    const data = await response.json();
    if (data && data.error) message = data.error;
  } catch (e) { /* not JSON: keep the status line */ }
  if (response.status === 401) askForKey(message);
  throw new ApiError(response.status, message);
}

async function apiJson(method, path, body) {
  return (await api(method, path, body)).json();
}

function show(el, text) {
  el.textContent = text;
  el.hidden = !text;
}

function fail(el, what, error) {
  show(el, what + ": " + (error && error.message ? error.message : String(error)));
}

function askForKey(why) {
  const form = $("key-form");
  form.hidden = false;
  if (why) show($("status"), why);
  $("api-key").focus();
}

function identityPath(name) {
  return "/identities/" + encodeURIComponent(name);
}

function fmt(x) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(4);
}

async function thumbnail(name) {
  if (thumbs.has(name)) return thumbs.get(name);
  try {
    const blob = await (await api("GET", identityPath(name) + "/thumbnail")).blob();
    const url = URL.createObjectURL(blob);
    thumbs.set(name, url);
    return url;
  } catch (e) {
    return null;
  }
}

function thumbImage(name) {
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = "thumbnail of " + name;
  thumbnail(name).then((url) => { if (url) img.src = url; });
  return img;
}

// ------------------------------------------------------------------ status and list

async function refreshHealth() {
  try {
    health = await apiJson("GET", "/health");
    const t = fmt(health.threshold);
    const n = health.identities;
    show($("status"), n + (n === 1 ? " identity" : " identities") + " · decisions at " + health.metric +
      " distance ≤ " + t);
    const needs = health.auth.reads ? "use this gallery" : "enroll and remove";
    $("key-for").textContent = needs;
    if ((health.auth.writes || health.auth.reads) && !apiKey) $("key-form").hidden = false;
  } catch (e) {
    show($("status"), "The server did not answer: " + e.message);
  }
}

async function refreshList() {
  const list = $("identities");
  show($("list-error"), "");
  let people;
  try {
    people = await apiJson("GET", "/identities");
  } catch (e) {
    fail($("list-error"), "Could not list the identities", e);
    return;
  }
  for (const url of thumbs.values()) URL.revokeObjectURL(url);
  thumbs = new Map();
  list.replaceChildren();
  $("count").textContent = "(" + people.length + ")";
  $("empty").hidden = people.length > 0;
  for (const person of people) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = person.identity;
    const count = document.createElement("span");
    count.className = "dist";
    count.textContent = person.examples + (person.examples === 1 ? " image" : " images");
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", "remove " + person.identity);
    remove.addEventListener("click", () => removeIdentity(person.identity));
    item.append(thumbImage(person.identity), name, count, remove);
    list.append(item);
  }
}

async function refresh() {
  await Promise.all([refreshHealth(), refreshList()]);
}

async function removeIdentity(name) {
  if (!window.confirm("Remove " + name + " and all their images?")) return;
  show($("list-error"), "");
  try {
    await api("DELETE", identityPath(name));
  } catch (e) {
    fail($("list-error"), "Could not remove " + name, e);
    return;
  }
  await refresh();
}

// ------------------------------------------------------------------ identify

async function identify(file) {
  const out = $("identify-result");
  show($("identify-error"), "");
  out.hidden = true;
  const form = new FormData();
  form.append("files", file);
  form.append("k", "5");
  let answer;
  try {
    [answer] = await apiJson("POST", "/identify", form);
  } catch (e) {
    fail($("identify-error"), "Could not look up the image", e);
    return;
  }
  const preview = $("query-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  const decision = $("decision");
  if (answer.identity !== null) {
    decision.textContent = answer.identity + " (distance " + fmt(answer.distance) +
      " ≤ " + fmt(answer.threshold) + ")";
    decision.className = "decision known";
  } else if (answer.candidates.length === 0) {
    decision.textContent = "unknown: nobody is enrolled yet";
    decision.className = "decision unknown";
  } else {
    decision.textContent = "unknown: nearest " + answer.candidates[0].identity + " at " +
      fmt(answer.distance) + " > " + fmt(answer.threshold);
    decision.className = "decision unknown";
  }
  const list = $("candidates");
  list.replaceChildren();
  for (const c of answer.candidates) {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = c.identity;
    const dist = document.createElement("span");
    const within = c.distance <= answer.threshold;
    dist.className = "dist" + (within ? " within" : "");
    dist.textContent = fmt(c.distance) + (within ? " ✓" : "");
    item.append(thumbImage(c.identity), name, dist);
    list.append(item);
  }
  out.hidden = false;
}

function setUpDrop() {
  const drop = $("drop");
  const input = $("identify-file");
  input.addEventListener("change", () => {
    if (input.files.length) identify(input.files[0]);
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) identify(file);
  });
}

// ------------------------------------------------------------------ verify and enroll

async function verify(event) {
  event.preventDefault();
  const out = $("verify-result");
  show($("verify-error"), "");
  out.hidden = true;
  const form = new FormData();
  form.append("a", $("verify-a").files[0]);
  form.append("b", $("verify-b").files[0]);
  let r;
  try {
    r = await apiJson("POST", "/verify", form);
  } catch (e) {
    fail($("verify-error"), "Could not compare", e);
    return;
  }
  out.textContent = (r.same ? "same" : "different") + ": distance " + fmt(r.distance) +
    (r.same ? " ≤ " : " > ") + "threshold " + fmt(r.threshold);
  out.className = "decision " + (r.same ? "known" : "unknown");
  out.hidden = false;
}

async function enroll(event) {
  event.preventDefault();
  show($("enroll-error"), "");
  show($("enroll-done"), "");
  const name = $("enroll-name").value;
  const files = $("enroll-files").files;
  const form = new FormData();
  form.append("identity", name);
  for (const file of files) form.append("files", file);
  let r;
  try {
    r = await apiJson("POST", "/identities", form);
  } catch (e) {
    fail($("enroll-error"), "Could not enroll " + name, e);
    return;
  }
  const n = r.examples.length;
  show($("enroll-done"), "Enrolled " + r.identity + " (" + n + (n === 1 ? " image)" : " images)"));
  $("enroll-form").reset();
  await refresh();
}

function useKey(event) {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  if (apiKey) sessionStorage.setItem(KEY_STORE, apiKey);
  else sessionStorage.removeItem(KEY_STORE);
  $("key-form").hidden = true;
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  setUpDrop();
  $("verify-form").addEventListener("submit", verify);
  $("enroll-form").addEventListener("submit", enroll);
  $("key-form").addEventListener("submit", useKey);
  refresh();
});
