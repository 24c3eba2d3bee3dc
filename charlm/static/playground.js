// The charlm playground: streams a generation from POST /v1/generate (Server-Sent Events read
// from a fetch body, since EventSource cannot POST), and shades each piece of a text by its
// log-probability from POST /v1/perplexity. Plain DOM, no build step, nothing from another host.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null;

function setStatus(element, text, isError = false) {
  element.textContent = text;
  element.classList.toggle("error", isError);
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return body.error || `HTTP ${response.status}`;
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

function optionalInt(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function requiredNumber(id, label) {
  const value = $(id).value.trim();
  if (value === "" || !Number.isFinite(Number(value))) throw new Error(`${label} must be a number`);
  return Number(value);
}

// A server started with --api-key answers 401 without it: ask once, keep it for this tab only.
async function api(path, options = {}) {
  for (let attempt = 0; ; attempt++) {
    const key = sessionStorage.getItem("charlm-api-key");
    const headers = { ...(options.headers || {}), ...(key ? { Authorization: `Bearer ${key}` } : {}) };
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401 || attempt > 0) return response;
    const given = window.prompt("This server needs its API key (charlm serve --api-key):");
    if (!given) return response;
    sessionStorage.setItem("charlm-api-key", given.trim());
  }
}

async function showModel() {
  try {
    const response = await api("/v1/model");
    if (!response.ok) throw new Error(await errorOf(response));
    const info = await response.json();
    const m = info.model_config;
    const steps = info.train_state && info.train_state.step != null ? `, trained ${info.train_state.step} steps` : "";
    $("model").textContent = `${m.num_layers}×${m.hidden_size} ${m.cell.toUpperCase()}, ${info.tokenizer} tokenizer ` +
      `(${info.vocab_size} tokens), ${info.parameters.toLocaleString()} parameters${steps} — ${info.checkpoint}`;
  } catch (e) {
    setStatus($("model"), `cannot read the model: ${e.message}`, true);
  }
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  return { name, data: data.length ? JSON.parse(data.join("\n")) : null };
}

async function generate() {
  if (controller) return;  // one generation at a time (Ctrl+Enter while one runs does nothing)
  const prime = $("prime").value;
  let request;
  try {
    request = {
      prime, stream: true,
      temperature: requiredNumber("temperature", "Temperature"),
      length: requiredNumber("length", "Length"),
      seed: optionalInt("seed"),
      top_k: optionalInt("top_k"),
    };
  } catch (e) {
    setStatus($("status"), e.message, true);
    return;
  }
  $("output-prime").textContent = prime;
  $("output-generated").textContent = "";
  $("generate").disabled = true;
  $("stop").disabled = false;
  setStatus($("status"), "generating…");
  controller = new AbortController();
  const started = performance.now();
  let pieces = 0;
  try {
    const response = await api("/v1/generate", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(request), signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorOf(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    let seed = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffered.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffered.slice(0, end));
        buffered = buffered.slice(end + 2);
        if (event.name === "start") seed = event.data.seed;
        else if (event.name === "error") throw new Error(event.data.error);
        else if (event.name === "message" && event.data.sample === 0 && event.data.text) {
          $("output-generated").textContent += event.data.text;
          pieces += 1;  // a piece is a token, or the bytes of one character for a byte model
        }
      }
    }
    const seconds = (performance.now() - started) / 1000;
    setStatus($("status"), `${pieces} pieces in ${seconds.toFixed(1)} s (seed ${seed})`);
  } catch (e) {
    if (e.name === "AbortError") setStatus($("status"), `stopped after ${pieces} pieces`);
    else setStatus($("status"), e.message, true);
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
    controller = null;
    $("inspect").value = $("output-prime").textContent + $("output-generated").textContent;
    $("shaded").textContent = "";  // stale: the surprise tab scores the new text when opened
  }
}

function bits(logprob) {
  return -logprob / Math.LN2;
}

function shade(logprob) {
  if (logprob === null) return "transparent";
  const t = Math.min(1, bits(logprob) / 10);  // 0 bits white → 10+ bits red
  const mix = (a, b, u) => Math.round(a + (b - a) * u);
  const [r, g, b] = t < 0.5
    ? [255, mix(255, 200, t * 2), mix(255, 120, t * 2)]
    : [mix(255, 230, t * 2 - 1), mix(200, 60, t * 2 - 1), mix(120, 40, t * 2 - 1)];
  return `rgb(${r},${g},${b})`;
}

function shown(token) {
  // Whitespace spelled out: a bare space in the list would look like nothing.
  return { "\n": "↵ newline", " ": "space", "\t": "tab", "<EOS>": "↵ <EOS>" }[token] ?? token;
}

function sameToken(text, token) {
  // A piece is its token, or (word models) a space and its word; a line end is "\n" or <EOS>.
  return text === "\n" ? token === "\n" || token === "<EOS>" : text === token || text === ` ${token}`;
}

function showTip(event, piece) {
  const tip = $("tip");
  tip.textContent = "";
  const head = document.createElement("div");
  head.textContent = piece.logprob === null
    ? `${JSON.stringify(piece.text)}: read first, not predicted`
    : `${JSON.stringify(piece.text)}: p = ${Math.exp(piece.logprob).toPrecision(3)} (${bits(piece.logprob).toFixed(2)} bits)`;
  tip.appendChild(head);
  if (piece.top.length) {
    const table = document.createElement("table");
    const caption = document.createElement("div");
    caption.textContent = "the model expected:";
    tip.appendChild(caption);
    for (const [token, logprob] of piece.top) {
      const row = table.insertRow();
      row.insertCell().textContent = shown(token);
      row.insertCell().textContent = `${(100 * Math.exp(logprob)).toFixed(1)}%`;
      if (sameToken(piece.text, token)) row.className = "got";
    }
    tip.appendChild(table);
  }
  tip.hidden = false;
  tip.style.left = `${Math.min(event.clientX + 12, window.innerWidth - 360)}px`;
  tip.style.top = `${event.clientY + 16}px`;
}

async function showSurprise() {
  const text = $("inspect").value;
  const target = $("shaded");
  setStatus($("summary"), "scoring…");
  $("score").disabled = true;
  try {
    const response = await api("/v1/perplexity", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text, logprobs: true, top: 5 }),
    });
    if (!response.ok) throw new Error(await errorOf(response));
    const result = await response.json();
    target.textContent = "";
    for (const piece of result.logprobs) {
      const span = document.createElement("span");
      span.textContent = piece.text;
      if (piece.text === "\n") span.className = "eol";
      if (piece.unknown) span.classList.add("unknown");
      span.style.backgroundColor = shade(piece.logprob);
      span.addEventListener("mouseenter", (event) => showTip(event, piece));
      span.addEventListener("mouseleave", () => { $("tip").hidden = true; });
      target.appendChild(span);
    }
    setStatus($("summary"), `${result.predicted_tokens} tokens predicted: ${result.bits_per_char.toFixed(3)} bits/char, ` +
      `perplexity ${result.perplexity.toFixed(2)}`);
  } catch (e) {
    setStatus($("summary"), e.message, true);
  } finally {
    $("score").disabled = false;
  }
}

function selectTab(name) {
  const surprise = name === "surprise";
  $("tab-text").setAttribute("aria-selected", String(!surprise));
  $("tab-surprise").setAttribute("aria-selected", String(surprise));
  $("text-view").hidden = surprise;
  $("surprise-view").hidden = !surprise;
  if (surprise && $("inspect").value && !$("shaded").textContent) showSurprise();
}

document.addEventListener("DOMContentLoaded", () => {
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("score").addEventListener("click", showSurprise);
  $("tab-text").addEventListener("click", () => selectTab("text"));
  $("tab-surprise").addEventListener("click", () => selectTab("surprise"));
  $("prime").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate();
  });
  showModel();
});
