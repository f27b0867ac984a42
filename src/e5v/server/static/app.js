// The search page of `e5v serve --db`. Everything shown comes from the /v1 endpoints,
// and every name and passage is written as text (textContent), never parsed as HTML.

const KEY_STORAGE = "e5v-api-key";
const KIND_LABELS = { image: "images", text: "texts" };
const IMAGE_TYPES = "a JPEG, PNG, WebP, GIF, BMP or TIFF file";

const $ = (id) => document.getElementById(id);
const form = $("search");
const text = $("text");
const fileInput = $("file");
const kindSelect = $("kind");
const kInput = $("k");
const results = $("results");

const state = {
  image: null, // {name, base64, previewUrl}
  like: null, // {id, name}
  last: null, // the last search asked: re-run when the key, kind or k changes
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
  if (keyForm.hidden) {
    keyForm.hidden = false;
    $("key").focus();
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key").value = "";
  $("key-form").hidden = true;
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
      setTimeout(loadCollection, 2000);
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
    showError(`“${file.name}” is not an image (${file.type}); choose ${IMAGE_TYPES}.`);
    return;
  }
  const reader = new FileReader();
  reader.onerror = () => showError(`“${file.name}” could not be read (${reader.error && reader.error.message}).`);
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
  return { k, kind: kindSelect.value || null };
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
  run({ body: { text: query || null, image: state.image ? state.image.base64 : null }, what });
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
    if (number === state.searches) {
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
for (const control of [kindSelect, kInput]) {
  control.addEventListener("change", () => {
    if (state.last) run(state.last);
  });
}
$("clear-like").addEventListener("click", () => {
  submit();
  text.focus();
});

// -- results ----------------------------------------------------------------------

function show(hits, what) {
  for (const url of state.thumbnailUrls) URL.revokeObjectURL(url);
  state.thumbnailUrls = [];
  results.replaceChildren(...hits.map(card));
  if (!hits.length) {
    const kind = kindSelect.value ? ` among ${KIND_LABELS[kindSelect.value] || kindSelect.value}` : "";
    setStatus(`No results${kind} for this ${what}.`);
  } else {
    setStatus(`${hits.length} result${hits.length === 1 ? "" : "s"} · ${what}`);
  }
}

function card(hit) {
  const name = fileName(hit.path);
  const item = element("li", "result");
  const article = element("article", `card ${hit.kind}`);
  article.tabIndex = 0;
  article.dataset.id = hit.id;
  article.dataset.kind = hit.kind;
  article.setAttribute("aria-label", `Result ${hit.rank}: ${hit.kind} ${name}, score ${hit.score.toFixed(3)}`);

  if (hit.thumbnail) {
    const frame = element("div", "thumb");
    const img = element("img");
    img.alt = name;
    img.decoding = "async";
    frame.append(img);
    article.append(frame);
    loadThumbnail(img, frame, hit.thumbnail);
  } else if (hit.text !== null && hit.text !== undefined) {
    article.append(element("p", "snippet", hit.text.replace(/([^\n])\n(?!\n)/g, "$1 "))); // unwrap hard-wrapped lines
  }

  const title = element("h2", "name", name);
  title.title = hit.path;
  article.append(title);

  const facts = element("p", "facts");
  facts.append(element("span", "rank", `#${hit.rank}`), element("span", "score", hit.score.toFixed(3)));
  facts.append(element("span", "kind", hit.kind));
  if (hit.passage !== null && hit.passage !== undefined) {
    facts.append(element("span", "span", `passage ${hit.passage + 1}, characters ${hit.start}–${hit.end}`));
  }
  for (const [key, value] of Object.entries(hit.metadata || {})) {
    if (key !== "sha256") facts.append(element("span", "meta", `${key} ${value}`));
  }
  article.append(facts);

  const like = element("button", "like-button", "More like this");
  like.type = "button";
  like.setAttribute("aria-label", `More like ${name}`);
  like.addEventListener("click", () => moreLike(hit));
  article.append(like);

  item.append(article);
  return item;
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
