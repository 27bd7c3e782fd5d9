// The page's only script: sends the chosen images to POST /classify (several at once as one batch request) and
// shows each answer. Everything it loads comes from this server.
"use strict";

const state = { experts: null };

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

async function describeModel() {
  try {
    const response = await fetch("/models");
    const [model] = (await response.json()).models;
    state.experts = model.num_experts;
    document.getElementById("model").textContent =
      `${model.name} ${model.version}: ${model.num_experts} experts, ${model.classes.length} classes, ` +
      `${model.precision} on ${model.provider}`;
  } catch (error) {
    document.getElementById("model").textContent = "The model's description is not available.";
  }
}

function showResult(file, answer, roundTripMs) {
  const row = element("article", "result");
  const image = element("img");
  image.src = URL.createObjectURL(file);
  image.alt = file.name;
  row.append(image);
  const text = element("div");
  text.append(element("div", "label", answer.label));
  for (const score of answer.top_k) {
    const bar = element("div", "bar");
    bar.append(element("span", "class", score.label));
    const meter = element("meter");
    meter.value = score.probability;
    bar.append(meter);
    bar.append(element("span", "probability", `${(100 * score.probability).toFixed(1)} %`));
    text.append(bar);
  }
  const saved = 100 * (1 - answer.relative_compute);
  text.append(
    element(
      "div",
      "meta",
      `experts used: ${answer.experts_used} of ${answer.num_experts} · compute saved: ${saved.toFixed(0)} % · ` +
        `server ${answer.timing_ms.total.toFixed(1)} ms (queue ${answer.timing_ms.queue.toFixed(1)}, ` +
        `inference ${answer.timing_ms.inference.toFixed(1)}) · round trip ${roundTripMs.toFixed(1)} ms · ${file.name}`,
    ),
  );
  row.append(text);
  document.getElementById("results").prepend(row);
}

async function classify(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("file", file, file.name);
  const query = new URLSearchParams({ top_k: document.getElementById("top-k").value || "3" });
  const threshold = document.getElementById("threshold").value;
  if (threshold !== "") query.set("threshold", threshold);
  const headers = {};
  const token = document.getElementById("token").value;
  if (token) headers.Authorization = `Bearer ${token}`;
  setStatus(`Classifying ${files.length} image${files.length > 1 ? "s" : ""}…`, false);
  const started = performance.now();
  try {
    const response = await fetch(`/classify?${query}`, { method: "POST", body: form, headers });
    const body = await response.json();
    const roundTripMs = performance.now() - started;
    if (!response.ok) {
      setStatus(`${response.status}: ${body.error.message}`, true);
      return;
    }
    const answers = body.results || [body];
    answers.forEach((answer, index) => showResult(files[index], answer, roundTripMs));
    setStatus(`Classified ${answers.length} image${answers.length > 1 ? "s" : ""} in ${roundTripMs.toFixed(1)} ms.`, false);
  } catch (error) {
    setStatus(`The request failed: ${error}`, true);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  describeModel();
  const input = document.getElementById("file");
  input.addEventListener("change", () => classify(Array.from(input.files)));
  const drop = document.getElementById("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    classify(Array.from(event.dataTransfer.files).filter((file) => file.type.startsWith("image/")));
  });
});
