// The job watcher: submits a job (POST /jobs), follows its event stream (GET /jobs/{id}/events) and shows where it
// is — its place in the queue, then a step progress bar with an ETA — with a cancel button, and at the end the
// image with its seed and timings and downloads in PNG, JPEG and WEBP (GET /image/{id}?format=…).
//
// It also shows a finished job from the history (the same view, from GET /jobs/{id}); opening one that is still
// queued or running follows it live.

import { ApiError, getJson, imageBlob, post, postJson, readEvents } from "./api.js";

const TERMINAL = new Set(["completed", "failed", "canceled"]);
const RECONNECTS = 5; // a stream cut before the job ended (a proxy's timeout, a network blip) is opened again
const EXTENSIONS = { png: "png", jpeg: "jpg", webp: "webp" };

export class JobWatcher {
  // hooks: onSeed(seed) after a job shows its seed; onEnded() when a watched job ends; onUseSettings(params);
  // onApiError(error) for errors that concern the key (401/403).
  constructor(el, hooks) {
    this.el = el;
    this.hooks = hooks;
    this.jobId = null;
    this.view = null; // the job's last GET /jobs/{id} view
    this.stream = null; // AbortController of the stream being read
    this.imageUrl = null; // object URL of the shown image, revoked when another replaces it
    el.cancel.addEventListener("click", () => this.cancel());
    for (const button of el.downloads) {
      button.addEventListener("click", () => this.download(button.dataset.format));
    }
    el.useSettings.addEventListener("click", () => {
      if (this.view) this.hooks.onUseSettings(this.view.params);
    });
  }

  // POST /jobs, then follow the job. Throws the ApiError of a refused job (the form shows it).
  async submit(body) {
    const accepted = await postJson("jobs", body);
    this.follow(accepted.task_id, accepted);
    return accepted;
  }

  // Show a job (a history item): its view now, and live updates if it has not ended.
  async open(jobId) {
    this.reset(jobId);
    try {
      const view = await getJson(`jobs/${encodeURIComponent(jobId)}`);
      if (TERMINAL.has(view.status)) await this.ended(view.status, view, { live: false });
      else this.follow(jobId, view);
    } catch (error) {
      this.fail(error);
    }
  }

  follow(jobId, first) {
    if (this.jobId !== jobId) this.reset(jobId);
    this.showQueued(first.queue_position);
    this.el.cancel.hidden = false;
    this.el.cancel.disabled = false;
    this.readStream(jobId);
  }

  reset(jobId) {
    if (this.stream) this.stream.abort();
    this.stream = null;
    this.jobId = jobId;
    this.view = null;
    this.el.empty.hidden = true;
    this.el.body.hidden = false;
    this.el.result.hidden = true;
    this.el.error.hidden = true;
    this.el.cancel.hidden = true;
    this.setProgress(null);
    this.el.progressText.textContent = "";
    this.el.status.textContent = "";
    this.el.body.dataset.jobId = jobId;
    this.el.body.dataset.status = "";
  }

  async readStream(jobId) {
    const controller = new AbortController();
    this.stream = controller;
    let ended = false;
    for (let attempt = 0; attempt <= RECONNECTS && !ended && this.jobId === jobId; attempt += 1) {
      try {
        await readEvents(`jobs/${encodeURIComponent(jobId)}/events`, (kind, data) => {
          if (this.jobId !== jobId) return; // another job took the panel meanwhile
          ended = ended || TERMINAL.has(kind);
          this.onEvent(kind, data);
        }, controller.signal);
      } catch (error) {
        if (error.name === "AbortError") return;
        if (error instanceof ApiError && error.status !== 0) {
          this.fail(error);
          return;
        }
      }
      if (!ended) await new Promise((resolve) => setTimeout(resolve, 1000 * (attempt + 1)));
    }
    if (!ended && this.jobId === jobId) {
      this.fail(new Error("Lost the job's event stream; it may still be running: see the history."));
    }
  }

  onEvent(kind, data) {
    this.el.body.dataset.status = kind;
    if (kind === "queued") {
      this.showQueued(data.queue_position);
    } else if (kind === "started") {
      const where = data.device ? `worker ${data.worker} (${data.device})` : `worker ${data.worker}`;
      this.el.status.textContent = `Running on ${where}`;
      this.setProgress(0);
      this.el.progressText.textContent = "Starting…";
    } else if (kind === "progress") {
      this.setProgress(data.percent);
      const eta = data.eta_s === null || data.eta_s === undefined ? "" : ` · about ${formatSeconds(data.eta_s)} left`;
      this.el.progressText.textContent = `Step ${data.step} of ${data.total_steps} (${Math.round(data.percent)} %)${eta}`;
    } else if (TERMINAL.has(kind)) {
      this.ended(kind, data);
    }
  }

  showQueued(position) {
    this.el.body.dataset.status = "queued";
    if (position === null || position === undefined) {
      this.el.status.textContent = "Submitted";
      return;
    }
    this.el.status.textContent = position === 0 ? "Queued · next in line" : `Queued · ${position} job${position === 1 ? "" : "s"} ahead`;
    this.el.progressText.textContent = "Waiting for a free worker…";
  }

  // The job ended: fetch its full view (timings, parameters) and show the image, the error or the cancellation.
  // live: it ended while the page watched (the history and the pool have news), not opened from the history.
  async ended(kind, data, { live = true } = {}) {
    const jobId = this.jobId;
    this.stream = null;
    this.el.cancel.hidden = true;
    this.el.body.dataset.status = kind;
    let view = data;
    try {
      view = data.params ? data : await getJson(`jobs/${encodeURIComponent(jobId)}`);
    } catch (error) {
      view = data; // the terminal event alone still says how it ended
    }
    if (this.jobId !== jobId) return;
    this.view = view;
    if (kind === "completed") {
      this.setProgress(100);
      this.el.status.textContent = "Done";
      this.el.progressText.textContent = "";
      await this.showResult(view);
    } else if (kind === "failed") {
      this.setProgress(null);
      this.el.status.textContent = "Failed";
      const error = view.error || {};
      this.showError(`${error.message || "the job failed"}${error.type ? ` (${error.type})` : ""}`);
    } else {
      this.setProgress(null);
      this.el.status.textContent = "Canceled";
      this.el.progressText.textContent = view.cancel_reason ? `Reason: ${view.cancel_reason}` : "";
    }
    if (live) this.hooks.onEnded(jobId, kind);
  }

  async showResult(view) {
    const result = view.result || {};
    if (result.seed !== undefined && result.seed !== null) this.hooks.onSeed(result.seed);
    this.el.facts.replaceChildren(...facts(view).flatMap(([name, value]) => [element("dt", name), element("dd", value)]));
    try {
      const blob = await imageBlob(view.task_id, "png");
      if (this.imageUrl) URL.revokeObjectURL(this.imageUrl);
      this.imageUrl = URL.createObjectURL(blob);
      this.el.image.src = this.imageUrl;
      this.el.result.hidden = false;
    } catch (error) {
      this.fail(error);
    }
  }

  async cancel() {
    if (!this.jobId) return;
    this.el.cancel.disabled = true;
    this.el.status.textContent = "Canceling…";
    try {
      await post(`jobs/${encodeURIComponent(this.jobId)}/cancel`);
    } catch (error) {
      // 409: it ended meanwhile, and its stream says how
      if (!(error instanceof ApiError && error.status === 409)) this.fail(error);
    }
  }

  async download(format) {
    if (!this.view) return;
    try {
      const blob = await imageBlob(this.view.task_id, format);
      const link = Object.assign(document.createElement("a"), {
        href: URL.createObjectURL(blob),
        download: `genserve-${this.view.task_id}.${EXTENSIONS[format]}`,
      });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 60_000); // the download has started by then
    } catch (error) {
      this.fail(error);
    }
  }

  setProgress(percent) {
    this.el.progress.hidden = percent === null;
    const value = percent === null ? 0 : Math.max(0, Math.min(100, percent));
    this.el.progress.setAttribute("aria-valuenow", String(value));
    this.el.bar.style.width = `${value}%`;
  }

  showError(message) {
    this.el.error.textContent = message;
    this.el.error.hidden = false;
  }

  fail(error) {
    this.showError(error.message);
    if (error instanceof ApiError) this.hooks.onApiError(error);
  }
}

function facts(view) {
  const params = view.params || {};
  const result = view.result || {};
  const rows = [
    ["Seed", String(result.seed ?? params.seed ?? "")],
    ["Size", `${result.width ?? params.width}×${result.height ?? params.height}`],
    ["Mode", view.mode],
    ["Steps", String(params.num_inference_steps ?? "")],
    ["Guidance", String(params.cfg ?? "")],
  ];
  if (params.strength !== undefined) rows.push(["Strength", String(params.strength)]);
  if (params.controlnet_type) rows.push(["ControlNet", params.controlnet_type]);
  if (view.device !== null && view.device !== undefined) rows.push(["Worker", `${view.worker} (${view.device})`]);
  if (view.started_at && view.submitted_at) rows.push(["Waited", formatSeconds(view.started_at - view.submitted_at)]);
  if (view.execution_time !== undefined) rows.push(["Ran", formatSeconds(view.execution_time)]);
  if (view.finished_at && view.submitted_at) rows.push(["Total", formatSeconds(view.finished_at - view.submitted_at)]);
  if (params.prompt) rows.push(["Prompt", params.prompt]);
  return rows;
}

function element(tag, text) {
  const node = document.createElement(tag);
  node.textContent = text;
  return node;
}

export function formatSeconds(seconds) {
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}
