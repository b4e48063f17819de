// The pool at a glance: the service state, each worker (state, device, current job, jobs done, restarts) from
// GET /status, and the running and waiting jobs from GET /queue. It refreshes every few seconds while the page is
// visible, and stops while the tab is hidden (document.visibilityState), so a forgotten tab costs the server nothing.

import { getJson } from "./api.js";

const REFRESH_MS = 2000;

export class PoolPanel {
  constructor(el, { onApiError }) {
    this.el = el;
    this.onApiError = onApiError;
    this.timer = null;
    document.addEventListener("visibilitychange", () => this.schedule());
  }

  start() {
    this.schedule();
  }

  // One refresh now and a timer while visible; none while hidden.
  schedule() {
    clearTimeout(this.timer);
    this.timer = null;
    if (document.visibilityState !== "visible") return;
    this.refresh().finally(() => {
      if (document.visibilityState === "visible") {
        clearTimeout(this.timer);
        this.timer = setTimeout(() => this.schedule(), REFRESH_MS);
      }
    });
  }

  async refresh() {
    let status;
    let queue;
    try {
      [status, queue] = await Promise.all([getJson("status"), getJson("queue")]);
    } catch (error) {
      this.el.error.textContent = `The pool cannot be shown: ${error.message}`;
      this.el.error.hidden = false;
      this.onApiError(error);
      return;
    }
    this.el.error.hidden = true;
    this.render(status, queue);
  }

  render(status, queue) {
    this.el.state.textContent = status.reason ? `${status.status}: ${status.reason}` : status.status;
    this.el.state.dataset.state = status.status;
    this.el.workers.replaceChildren(...status.workers.map((worker) => workerRow(worker)));
    const { size, max_size: max } = status.queue;
    const running = queue.queue_running.length;
    this.el.summary.textContent = `${running} running · ${size} waiting (of at most ${max}) · ${status.concurrent_manager.total_restarts} restarts in all`;
    const items = [
      ...queue.queue_running.map((job) =>
        queueItem(job, `running on worker ${job.worker} · ${Math.round(job.progress?.percent ?? 0)} %`),
      ),
      ...queue.queue_pending.map((job) =>
        queueItem(job, `${job.queue_position} ahead · priority ${job.priority}`),
      ),
    ];
    this.el.queue.replaceChildren(...items);
  }
}

function workerRow(worker) {
  const row = document.createElement("tr");
  row.dataset.slot = worker.slot;
  row.dataset.state = worker.state;
  const job = worker.current_job ? worker.current_job.slice(0, 8) : "—";
  const cells = [`#${worker.slot}`, worker.state, worker.device, job, String(worker.jobs_done), String(worker.restarts)];
  for (const text of cells) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.append(cell);
  }
  row.children[1].className = `state state-${worker.state}`;
  if (worker.current_job) row.children[3].title = worker.current_job;
  if (worker.last_error) row.title = `last error: ${worker.last_error}`;
  return row;
}

function queueItem(job, where) {
  const item = document.createElement("li");
  item.textContent = `${job.task_id.slice(0, 8)} · ${job.mode} · ${where}`;
  item.title = job.task_id;
  return item;
}
