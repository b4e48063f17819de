// Image inputs: choose a file or drop one on the box. Each keeps the image as a data: URI (what POST /jobs takes
// in JSON) with its pixel size, after checking it against the server's limits, so a bad file is refused here with
// the reason instead of after the upload.

const ACCEPTED_TYPES = ["image/png", "image/jpeg", "image/webp"];

// Read a File into { dataUrl, width, height, name, bytes }, or throw an Error that says what is wrong with it.
export async function readImage(file, limits) {
  if (!ACCEPTED_TYPES.includes(file.type)) {
    throw new Error(`${file.name || "the file"} is ${file.type || "not an image"}: use PNG, JPEG or WEBP`);
  }
  const maxBytes = limits.max_upload_mb * 1024 * 1024;
  if (file.size > maxBytes) {
    throw new Error(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB, more than the server's ${limits.max_upload_mb} MB`);
  }
  const dataUrl = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`${file.name} cannot be read`));
    reader.readAsDataURL(file);
  });
  const image = new Image();
  image.src = dataUrl;
  try {
    await image.decode();
  } catch {
    throw new Error(`${file.name} is not an image this browser can decode`);
  }
  const { naturalWidth: width, naturalHeight: height } = image;
  if (width * height > limits.max_input_pixels) {
    throw new Error(`${file.name} is ${width}×${height} pixels, more than the server's limit of ${limits.max_input_pixels}`);
  }
  return { dataUrl, width, height, name: file.name, bytes: file.size };
}

export class ImageInput {
  // box: the .image-input element; limits(): the server's limits; onChange(field, image | null).
  constructor(box, limits, onChange) {
    this.box = box;
    this.field = box.dataset.field;
    this.limits = limits;
    this.onChange = onChange;
    this.image = null;
    this.fileInput = box.querySelector("input[type=file]");
    this.drop = box.querySelector(".drop");
    this.preview = box.querySelector(".preview");
    this.text = box.querySelector(".drop-text");
    this.size = box.querySelector(".image-size");
    this.clearButton = box.querySelector(".image-clear");
    this.error = box.querySelector(".field-error");

    this.fileInput.addEventListener("change", () => {
      if (this.fileInput.files.length) this.load(this.fileInput.files[0]);
    });
    this.drop.addEventListener("dragover", (event) => {
      event.preventDefault(); // without it the browser opens the dropped file instead
      this.drop.classList.add("dragging");
    });
    this.drop.addEventListener("dragleave", () => this.drop.classList.remove("dragging"));
    this.drop.addEventListener("drop", (event) => {
      event.preventDefault();
      this.drop.classList.remove("dragging");
      const file = event.dataTransfer.files[0];
      if (file) this.load(file);
    });
    this.drop.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        this.fileInput.click();
      }
    });
    this.clearButton.addEventListener("click", () => this.set(null));
  }

  async load(file) {
    this.error.textContent = "";
    try {
      this.set(await readImage(file, this.limits()));
    } catch (error) {
      this.set(null);
      this.error.textContent = error.message;
    }
  }

  set(image) {
    this.image = image;
    this.fileInput.value = ""; // choosing the same file again still fires "change"
    this.preview.hidden = !image;
    this.text.hidden = Boolean(image);
    this.clearButton.hidden = !image;
    this.size.textContent = image ? `${image.name} · ${image.width}×${image.height}` : "";
    if (image) this.preview.src = image.dataUrl;
    else this.preview.removeAttribute("src");
    this.onChange(this.field, image);
  }
}
