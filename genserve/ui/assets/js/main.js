// The playground's entry point: finds the page's parts, builds one object per role and wires them together.
//
//   api.js      the HTTP client (relative URLs, the key header, SSE over fetch, errors with the server's message)
//   keys.js     the API key: local storage, the dialog, what 401 and 403 mean
//   form.js     the generation form and its checks (uploads.js: image inputs; mask.js: the fill mask painter)
//   job.js      one job: submit, follow its events, progress, cancel, result and downloads
//   gallery.js  the history of this key's jobs
//   pool.js     the queue and the workers
//
// Start-up reads GET /models first: it says which modes the server runs and the limits the form checks. When it
// answers 401 the page asks for a key instead of showing nothing.

import { ApiError, getJson } from "./api.js";
import { GenerateForm } from "./form.js";
import { Gallery } from "./gallery.js";
import { JobWatcher } from "./job.js";
import { KeyPrompt, explain } from "./keys.js";
import { MaskPainter } from "./mask.js";
import { PoolPanel } from "./pool.js";

const $ = (selector) => document.querySelector(selector);
const RETRY_MS = 3000; // an unreachable server is tried again this often

const notice = $("#notice");

function showNotice(text, kind = "info") {
  notice.textContent = text;
  notice.dataset.kind = kind;
  notice.hidden = !text;
}

// 401: ask for a key (the dialog says why); 403: the key works but lacks a scope, which a new key may fix.
function onApiError(error) {
  if (!(error instanceof ApiError)) return;
  if (error.status === 401) {
    showNotice(explain(error), "error");
    keys.ask(explain(error));
  } else if (error.status === 403) {
    showNotice(explain(error), "error");
  }
}

const keys = new KeyPrompt(
  {
    button: $("#key-button"),
    dialog: $("#key-dialog"),
    form: $("#key-form"),
    reason: $("#key-reason"),
    input: $("#key-input"),
    forget: $("#key-forget"),
  },
  () => start(),
);

const mask = new MaskPainter({
  stage: $("#mask-stage"),
  canvas: $("#mask-canvas"),
  background: $("#mask-background"),
  brushSize: $("#brush-size"),
  brushSizeValue: $("#brush-size-value"),
  toolRadios: document.querySelectorAll("input[name=mask-tool]"),
  clearButton: $("#mask-clear"),
  invertButton: $("#mask-invert"),
});

const gallery = new Gallery(
  {
    list: $("#gallery"),
    empty: $("#history-empty"),
    error: $("#history-error"),
    refresh: $("#history-refresh"),
    more: $("#history-more"),
  },
  { onOpen: (jobId) => watcher.open(jobId), onApiError },
);

const watcher = new JobWatcher(
  {
    empty: $("#job-empty"),
    body: $("#job-body"),
    status: $("#job-status"),
    progress: $("#progress"),
    bar: $("#progress-bar"),
    progressText: $("#progress-text"),
    cancel: $("#cancel"),
    error: $("#job-error"),
    result: $("#result"),
    image: $("#result-image"),
    facts: $("#result-facts"),
    downloads: document.querySelectorAll("#result .download"),
    useSettings: $("#use-settings"),
  },
  {
    onSeed: (seed) => form.setLastSeed(seed),
    onEnded: () => {
      gallery.refresh();
      pool.refresh(); // the worker is free now: say so at once rather than at the next tick
    },
    onUseSettings: (params) => {
      form.applyParams(params);
      $("#generate-form").scrollIntoView({ behavior: "smooth" });
    },
    onApiError,
  },
);

const form = new GenerateForm($("#generate-form"), mask, async (body) => {
  form.setBusy(true);
  try {
    await watcher.submit(body);
    gallery.refresh(); // the new job shows as queued or running at once
  } catch (error) {
    form.showServerError(error instanceof ApiError ? explain(error) : error.message);
    onApiError(error);
  } finally {
    form.setBusy(false);
  }
});

const pool = new PoolPanel(
  {
    state: $("#pool-state"),
    error: $("#pool-error"),
    workers: $("#workers"),
    summary: $("#queue-summary"),
    queue: $("#queue"),
  },
  { onApiError },
);

let retry = null;

async function start() {
  clearTimeout(retry);
  let model;
  try {
    [model] = await getJson("models");
  } catch (error) {
    if (error instanceof ApiError && error.status === 0) {
      showNotice(`${error.message} Trying again…`, "error");
      retry = setTimeout(start, RETRY_MS);
    } else {
      showNotice(error instanceof ApiError ? explain(error) : error.message, "error");
      onApiError(error);
    }
    return;
  }
  $("#model-name").textContent = model.model_name;
  showNotice(modelNotice(model), model.embedded_test_model ? "warning" : "info");
  form.configure(model);
  document.body.dataset.ready = "true"; // the form has the server's limits: tests (and people) may use it now
  gallery.refresh();
  pool.start();
}

function modelNotice(model) {
  const notes = [];
  if (model.embedded_test_model) {
    notes.push("This server runs the embedded random-weight test model: the whole pipeline runs, but images are noise. Set model.path to a FLUX.1-dev folder for real images.");
  }
  if (model.available_gpu_processes === 0) {
    notes.push("No worker is ready yet: jobs wait in the queue until one has loaded.");
  }
  return notes.join(" ");
}

start();
