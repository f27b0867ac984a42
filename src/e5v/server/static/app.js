// The search page of `e5v serve --db`. Everything shown comes from the /v1 endpoints,
// and every name and passage is written as text (textContent), never parsed as HTML.

const KEY_STORAGE = "e5v-api-key";
const KIND_LABELS = { image: "images", text: "texts" };
const KIND_NAMES = { image: "image", text: "text", interleaved: "image and text" };
const IMAGE_TYPES = "a JPEG, PNG, WebP, GIF, BMP or TIFF file";

const $ = (id) => document.getElementById(id);
const form = $("search");
const text = $("text");
const fileInput = $("file");
const kindSelect = $("kind");
const groupSelect = $("group");
const whereInput = $("where");
const kInput = $("k");
const results = $("results");
const go = $("go");
// a filter starts where a KEY and its operator follow a space: "path~my notes page=1..2"
const FILTER_START = /\s+(?=[A-Za-z_][\w.-]*\s*(?:!=|\^=|~|=))/;

const state = {
  image: null, // {name, base64, previewUrl}
  like: null, // {id, name}
  last: null, // the last search asked: re-run when the key, kind, group, filter or k changes
  waiting: null, // a search asked while the model loads: run once it is ready
  locked: false, // the key form is open: the search form waits behind it
  polling: false, // a check of the model's readiness is due
  thumbnailUrls: [],
  searches: 0,
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** fetch() with the tab's key; a refused key opens the key form. */
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch {
    throw new ApiError(0, "The server cannot be reached: is `e5v serve` still running?");
  }
  if (response.status === 401) {
    askForKey(key ? "The server refused that key; check it and try again." : "");
    throw new ApiError(401, "This server needs an API key: enter it above.");
  }
  if (!response.ok) {
    let message = `The server answered ${response.status} ${response.statusText}.`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch {
      // not JSON: keep the status line
    }
    throw new ApiError(response.status, message);
  }
  return response;
}

// -- the key ------------------------------------------------------------------------

function askForKey(message) {
  const keyForm = $("key-form");
  const keyError = $("key-error");
  keyError.textContent = message;
  keyError.hidden = !message;
  lock(true);
  if (keyForm.hidden) {
    keyForm.hidden = false;
    $("key").focus();
  }
}

/** The search form's controls, off while the key form is open. */
function lock(locked) {
  state.locked = locked;
  for (const control of form.elements) control.disabled = locked;
  form.classList.toggle("locked", locked);
  form.setAttribute("aria-disabled", String(locked));
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key").value = "";
  $("key-form").hidden = true;
  lock(false);
  showError("");
  loadCollection().then((ok) => {
    if (ok && state.last) run(state.last);
  });
});

// -- the collection ---------------------------------------------------------------

async function loadCollection() {
  const line = $("collection");
  try {
    const info = await (await api("/v1/collection")).json();
    const kinds = Object.entries(info.kinds).map(([kind, count]) => `${count} ${KIND_LABELS[kind] || kind}`);
    const model = info.model.split(/[\\/]/).filter(Boolean).pop() || info.model;
    line.textContent = `${info.name} · ${info.records} records (${kinds.join(", ")}) · model ${model}`;
    line.title = info.model + (info.revision ? ` @ ${info.revision}` : "");
    if (!info.ready) {
      line.textContent += " · loading the model…";
      if (!state.polling) {
        state.polling = true;
        setTimeout(() => {
          state.polling = false;
          loadCollection();
        }, 1000);
      }
    } else if (state.waiting) {
      const search = state.waiting;
      state.waiting = null;
      run(search);
    }
    fillKinds(Object.keys(info.kinds));
    return true;
  } catch (error) {
    line.textContent = error.status === 401 ? "Locked: this server needs an API key." : error.message;
    return false;
  }
}

function fillKinds(kinds) {
  const chosen = kindSelect.value;
  const options = [new Option("all kinds", "")];
  for (const kind of kinds) options.push(new Option(KIND_LABELS[kind] || kind, kind));
  kindSelect.replaceChildren(...options);
  kindSelect.value = kinds.includes(chosen) ? chosen : "";
}

// -- the query image --------------------------------------------------------------

function chooseImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    refuseUpload(`“${file.name}” is not an image (${file.type}); choose ${IMAGE_TYPES}.`);
    return;
  }
  const reader = new FileReader();
  reader.onerror = () => refuseUpload(`“${file.name}” could not be read; choose ${IMAGE_TYPES}.`);
  reader.onload = () => {
    clearImage();
    const dataUrl = String(reader.result);
    state.image = { name: file.name, base64: dataUrl.slice(dataUrl.indexOf(",") + 1), previewUrl: URL.createObjectURL(file) };
    $("preview").src = state.image.previewUrl;
    $("image-name").textContent = file.name;
    $("image-empty").hidden = true;
    $("image-chosen").hidden = false;
    submit();
  };
  reader.readAsDataURL(file);
}

/** A file that cannot be a query: the old results go, and the reason is said. */
function refuseUpload(message) {
  clearImage();
  clearResults();
  state.last = null;
  setStatus("");
  showError(message);
}

function clearImage() {
  if (state.image) URL.revokeObjectURL(state.image.previewUrl);
  state.image = null;
  fileInput.value = "";
  $("preview").removeAttribute("src");
  $("image-chosen").hidden = true;
  $("image-empty").hidden = false;
}

fileInput.addEventListener("change", () => chooseImage(fileInput.files[0]));
$("clear-image").addEventListener("click", () => {
  clearImage();
  fileInput.focus();
});

const drop = $("drop");
document.addEventListener("dragover", (event) => {
  event.preventDefault(); // else the browser opens the dropped file
  drop.classList.add("dragging");
});
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) drop.classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("dragging");
  const files = event.dataTransfer ? event.dataTransfer.files : [];
  if (files.length) chooseImage(files[0]);
});
document.addEventListener("paste", (event) => {
  const files = event.clipboardData ? [...event.clipboardData.files] : [];
  const image = files.find((file) => file.type.startsWith("image/"));
  if (image) {
    event.preventDefault();
    chooseImage(image);
  }
});

// -- searching --------------------------------------------------------------------

function options() {
  const k = Math.min(200, Math.max(1, Number.parseInt(kInput.value, 10) || 12));
  kInput.value = String(k);
  const where = whereInput.value.trim() ? whereInput.value.trim().split(FILTER_START) : null;
  return { k, kind: kindSelect.value || null, group: groupSelect.value || null, where };
}

function submit() {
  const query = text.value.trim();
  state.like = null;
  $("like-banner").hidden = true;
  if (!query && !state.image) {
    showError("");
    setStatus("Type a query and press Enter, or choose, drop or paste an image.");
    return;
  }
  const what = state.image ? (query ? "composed query" : "image query") : "text query";
  const image = state.image ? { name: state.image.name } : null;
  run({ body: { text: query || null, image: state.image ? state.image.base64 : null }, what, image });
}

function moreLike(hit) {
  state.like = { id: hit.id, name: fileName(hit.path) };
  $("like-name").textContent = state.like.name;
  $("like-banner").hidden = false;
  run({ body: { like: hit.id }, what: `records like ${state.like.name}` });
}

async function run(search) {
  state.last = search;
  const number = ++state.searches;
  showError("");
  setStatus("Searching…");
  results.setAttribute("aria-busy", "true");
  form.classList.add("busy");
  try {
    const body = JSON.stringify({ ...search.body, ...options() });
    const response = await api("/v1/search", { method: "POST", headers: { "Content-Type": "application/json" }, body });
    const answer = await response.json();
    if (number === state.searches) show(answer.hits, search.what);
  } catch (error) {
    if (number !== state.searches) return;
    if (error.status === 503) {
      state.waiting = search; // run by loadCollection once the model is ready
      setStatus("The model is loading; your search runs as soon as it is ready.");
      if (!state.polling) loadCollection();
    } else if (error.status === 400 && search.image && /^image:/.test(error.message)) {
      clearImage();
      refuseUpload(`“${search.image.name}” cannot be searched: ${error.message.replace(/^image:\s*/, "")}`);
    } else {
      setStatus("");
      showError(error.message);
    }
  } finally {
    if (number === state.searches) {
      results.removeAttribute("aria-busy");
      form.classList.remove("busy");
    }
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
for (const control of [kindSelect, groupSelect, kInput, whereInput]) {
  control.addEventListener("change", () => {
    if (state.last) run(state.last);
  });
}
$("clear-like").addEventListener("click", () => {
  submit();
  text.focus();
});

// -- results ----------------------------------------------------------------------

function clearResults() {
  for (const url of state.thumbnailUrls) URL.revokeObjectURL(url);
  state.thumbnailUrls = [];
  results.replaceChildren();
}

function show(hits, what) {
  clearResults();
  results.replaceChildren(...hits.map(card));
  if (!hits.length) {
    const kind = kindSelect.value ? ` among ${KIND_LABELS[kindSelect.value] || kindSelect.value}` : "";
    setStatus(`No results${kind} for this ${what}.`);
  } else {
    setStatus(`${hits.length} result${hits.length === 1 ? "" : "s"} · ${what}`);
  }
}

/** What a hit is: "page 2 of 5", a passage's number (as stored, from 0, as the CLI shows it). */
function where(hit) {
  const page = hit.metadata && Number.isInteger(hit.metadata.page) && hit.path.toLowerCase().endsWith(".pdf")
    ? hit.metadata.page
    : null;
  const parts = [];
  if (page !== null) parts.push(hit.pages ? `page ${page} of ${hit.pages}` : `page ${page}`);
  if (hit.passage !== null && hit.passage !== undefined) parts.push(`passage ${hit.passage}`);
  return { page, text: parts.join(" · ") };
}

function card(hit) {
  const name = fileName(hit.path);
  const place = where(hit);
  const kinds = hit.kinds ? Object.keys(hit.kinds) : [hit.kind];
  const item = element("li", "result");
  const article = element("article", `card ${hit.kind}${hit.kinds ? " grouped" : ""}`);
  article.tabIndex = 0;
  article.dataset.id = hit.id;
  article.dataset.kind = hit.kind;
  const label = place.text ? `${name}, ${place.text}` : name;
  article.setAttribute("aria-label", `Result ${hit.rank}: ${label}, score ${score(hit)}`);

  if (hit.thumbnail) {
    const frame = element("button", "thumb");
    frame.type = "button";
    frame.title = `Open ${name}${place.page ? ` at page ${place.page}` : ""}`;
    frame.setAttribute("aria-label", frame.title);
    const img = element("img");
    img.alt = name;
    img.decoding = "async";
    frame.append(img);
    frame.addEventListener("click", () => openFile(hit, place.page));
    article.append(frame);
    loadThumbnail(img, frame, hit.thumbnail);
  }
  if (hit.text !== null && hit.text !== undefined) {
    const snippet = element("p", "snippet", hit.text.replace(/([^\n])\n(?!\n)/g, "$1 ")); // unwrap hard-wrapped lines
    article.append(snippet);
    const more = element("button", "more-button", "Show the whole passage");
    more.type = "button";
    more.setAttribute("aria-expanded", "false");
    more.addEventListener("click", () => {
      const open = article.classList.toggle("expanded");
      more.textContent = open ? "Show less" : "Show the whole passage";
      more.setAttribute("aria-expanded", String(open));
    });
    more.hidden = true; // shown once laid out, if the passage is cut
    requestAnimationFrame(() => {
      more.hidden = snippet.scrollHeight <= snippet.clientHeight + 1;
    });
    article.append(more);
  }

  const title = element("h2", "name", name);
  title.title = hit.path;
  article.append(title);

  const facts = element("p", "facts");
  facts.append(element("span", "score", score(hit)));
  facts.append(element("span", "kind", kinds.map((kind) => KIND_NAMES[kind] || kind).join(" + ")));
  if (place.text) facts.append(element("span", "place", place.text));
  article.append(facts);

  const actions = element("div", "actions");
  const open = element("button", "open-button", place.page ? `Open page ${place.page}` : "Open");
  open.type = "button";
  open.setAttribute("aria-label", `Open ${label}`);
  open.addEventListener("click", () => openFile(hit, place.page));
  const like = element("button", "like-button", "More like this");
  like.type = "button";
  like.setAttribute("aria-label", `More like ${name}`);
  like.addEventListener("click", () => moreLike(hit));
  actions.append(open, like);
  article.append(actions);

  item.append(article);
  return item;
}

/** A hit's score: a grouped hit's fusion of its kinds' ranks, else its cosine similarity. */
function score(hit) {
  return hit.kinds ? hit.score.toFixed(4) : hit.score.toFixed(3);
}

/** Open the file a hit was found in (with the key), a PDF at its page, in a new tab. */
async function openFile(hit, page) {
  const opened = window.open("", "_blank");
  try {
    const blob = await (await api(hit.file)).blob();
    const url = URL.createObjectURL(blob) + (page ? `#page=${page}` : "");
    if (opened) opened.location.href = url;
    else window.location.href = url;
  } catch (error) {
    if (opened) opened.close();
    showError(error.message);
  }
}

async function loadThumbnail(img, frame, url) {
  try {
    const blob = await (await api(url)).blob();
    const objectUrl = URL.createObjectURL(blob);
    state.thumbnailUrls.push(objectUrl);
    img.src = objectUrl;
  } catch (error) {
    frame.classList.add("missing");
    frame.replaceChildren(element("span", "missing-text", `No preview: ${error.message}`));
  }
}

// -- small helpers ----------------------------------------------------------------

function element(tag, className, content) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (content !== undefined) node.textContent = content;
  return node;
}

function fileName(path) {
  return String(path).split(/[\\/]/).pop() || String(path);
}

function setStatus(message) {
  $("status").textContent = message;
}

function showError(message) {
  const error = $("error");
  error.textContent = message;
  error.hidden = !message;
}

loadCollection();
text.focus();
