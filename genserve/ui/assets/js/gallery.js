// The history: recent jobs of this key (GET /jobs, newest first; a key sees only its own jobs, an admin key all),
// each as a card with its thumbnail (GET /image/{id}, fetched as a blob so the key rides along) and its state.
// Opening a card shows the job in the result panel.

import { getJson, imageBlob } from "./api.js";

const PAGE_SIZE = 24;
const STATUS_LABELS = { queued: "queued", running: "running", completed: "", failed: "failed", canceled: "canceled" };

export class Gallery {
  // onOpen(jobId): show the job; onApiError(error): a 401/403 to explain.
  constructor(el, { onOpen, onApiError }) {
    this.el = el;
    this.onOpen = onOpen;
    this.onApiError = onApiError;
    this.offset = 0;
    this.thumbnails = new Map(); // job id -> object URL, kept across refreshes so images are fetched once
    el.refresh.addEventListener("click", () => this.refresh());
    el.more.addEventListener("click", () => this.loadMore());
  }

  async refresh() {
    this.offset = 0;
    await this.load({ replace: true });
  }

  async loadMore() {
    this.offset += PAGE_SIZE;
    await this.load({ replace: false });
  }

  async load({ replace }) {
    let listing;
    try {
      listing = await getJson("jobs", { limit: PAGE_SIZE, offset: this.offset });
    } catch (error) {
      this.el.error.textContent = `The history cannot be loaded: ${error.message}`;
      this.el.error.hidden = false;
      this.onApiError(error);
      return;
    }
    this.el.error.hidden = true;
    const cards = listing.jobs.map((job) => this.card(job));
    if (replace) {
      this.forgetThumbnailsNotIn(listing.jobs);
      this.el.list.replaceChildren(...cards);
    } else {
      this.el.list.append(...cards);
    }
    this.el.empty.hidden = listing.total > 0;
    this.el.more.hidden = this.offset + listing.jobs.length >= listing.total;
  }

  card(job) {
    const item = document.createElement("li");
    item.className = `card status-${job.status}`;
    item.dataset.jobId = job.task_id;
    const button = document.createElement("button");
    button.type = "button";
    button.title = job.params?.prompt || job.task_id;
    button.addEventListener("click", () => this.onOpen(job.task_id));
    const picture = document.createElement("div");
    picture.className = "thumb";
    if (job.status === "completed") {
      const image = document.createElement("img");
      image.alt = job.params?.prompt || "generated image";
      picture.append(image);
      this.thumbnail(job.task_id).then((src) => {
        if (src) image.src = src;
      });
    } else {
      picture.textContent = STATUS_LABELS[job.status] ?? job.status;
    }
    const caption = document.createElement("span");
    caption.className = "caption";
    caption.textContent = `${job.mode} · ${job.params?.prompt || "(no prompt)"}`;
    button.append(picture, caption);
    item.append(button);
    return item;
  }

  async thumbnail(jobId) {
    if (!this.thumbnails.has(jobId)) {
      // A pending promise is stored at once, so two refreshes in a row fetch the image once.
      this.thumbnails.set(
        jobId,
        imageBlob(jobId, "webp")
          .then((blob) => URL.createObjectURL(blob))
          .catch(() => null), // deleted by retention meanwhile: the card stays, without a picture
      );
    }
    return this.thumbnails.get(jobId);
  }

  forgetThumbnailsNotIn(jobs) {
    const shown = new Set(jobs.map((job) => job.task_id));
    for (const [jobId, promise] of this.thumbnails) {
      if (shown.has(jobId)) continue;
      promise.then((src) => src && URL.revokeObjectURL(src));
      this.thumbnails.delete(jobId);
    }
  }
}
