// The generation form: the mode, the prompt, the numbers and the images, checked against the limits the server
// publishes in GET /models (the same numbers genserve/prepare.py enforces), and turned into a POST /jobs body.
//
// Errors found here are shown under their field before anything is sent; errors the server finds anyway (a limit
// changed since the page loaded, a file the server cannot decode) come back as its message, shown under the field
// it names or above the button.

import { seedJson } from "./api.js";
import { ImageInput } from "./uploads.js";

const MODE_LABELS = {
  text2img: "Text to image",
  img2img: "Image to image",
  fill: "Fill (inpaint)",
  controlnet: "ControlNet",
  redux: "Redux (variations)",
};
// The images each mode cannot run without (genserve/prepare.py REQUIRED_IMAGES) and those it may take.
const REQUIRED_IMAGES = { text2img: [], img2img: ["input_image"], fill: ["input_image"], controlnet: ["control_image"], redux: ["input_image"] };
const USED_IMAGES = { text2img: [], img2img: ["input_image"], fill: ["input_image"], controlnet: ["control_image", "input_image"], redux: ["input_image"] };
const FIELDS = ["prompt", "width", "height", "num_inference_steps", "cfg", "seed", "priority", "strength", "input_image", "mask_image", "control_image"];
const INT_PATTERN = /^-?\d+$/;

export class GenerateForm {
  // elements: the form's parts (see main.js); mask: the MaskPainter; onSubmit(body): sends a valid body.
  constructor(form, mask, onSubmit) {
    this.form = form;
    this.mask = mask;
    this.onSubmit = onSubmit;
    this.model = null; // GET /models' first entry, once loaded
    this.mode = "text2img";
    this.lastSeed = null;
    this.images = {};
    this.inputs = Object.fromEntries(FIELDS.map((name) => [name, form.querySelector(`#${name}`)]).filter(([, el]) => el));
    this.formError = form.querySelector("#form-error");
    this.submitButton = form.querySelector("#generate");

    for (const box of form.querySelectorAll(".image-input")) {
      new ImageInput(box, () => this.limits(), (field, image) => this.imageChanged(field, image));
    }
    this.inputs.strength.addEventListener("input", () => {
      form.querySelector("#strength-value").textContent = Number(this.inputs.strength.value).toFixed(2);
    });
    form.querySelector("#seed-random").addEventListener("click", () => {
      this.inputs.seed.value = "";
      this.clearFieldError("seed");
    });
    this.reuseButton = form.querySelector("#seed-reuse");
    this.reuseButton.addEventListener("click", () => {
      if (this.lastSeed !== null) this.inputs.seed.value = String(this.lastSeed);
      this.clearFieldError("seed");
    });
    form.addEventListener("input", (event) => this.clearFieldError(event.target.name));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
  }

  limits() {
    return this.model ? this.model.limits : { max_upload_mb: 50, max_input_pixels: 4096 * 4096 };
  }

  // Fill the form from GET /models: the modes served, the limits, the defaults, the ControlNet types.
  // Called again after a new key is entered: the fields keep what the user typed, only the first call fills them.
  configure(model) {
    const first = !this.model;
    this.model = model;
    const { limits, defaults } = model;
    const modes = model.modes;
    const modeBox = this.form.querySelector("#modes");
    modeBox.querySelectorAll("label").forEach((label) => label.remove());
    for (const mode of modes) {
      const label = document.createElement("label");
      label.className = "mode";
      const radio = Object.assign(document.createElement("input"), { type: "radio", name: "mode", value: mode });
      radio.addEventListener("change", () => this.setMode(mode));
      label.append(radio, ` ${MODE_LABELS[mode] || mode}`);
      modeBox.append(label);
    }
    for (const name of ["width", "height"]) {
      Object.assign(this.inputs[name], { min: limits.min_size, max: limits.max_size, step: limits.size_multiple });
    }
    Object.assign(this.inputs.num_inference_steps, { min: limits.min_steps, max: limits.max_steps });
    Object.assign(this.inputs.cfg, { min: 0, max: limits.max_cfg });
    this.inputs.prompt.maxLength = limits.max_prompt_chars;
    const select = this.form.querySelector("#controlnet_type");
    const chosenType = select.value;
    select.replaceChildren(...model.controlnet_types.map((type) => new Option(type, type)));
    select.value = first ? defaults.controlnet_type : chosenType;
    if (first) {
      for (const name of ["width", "height", "num_inference_steps", "priority", "strength"]) {
        this.inputs[name].value = defaults[name];
      }
      this.inputs.strength.dispatchEvent(new Event("input"));
    }
    this.form.querySelector("#limits-hint").textContent =
      `Sizes ${limits.min_size}–${limits.max_size} (multiples of ${limits.size_multiple}), steps ${limits.min_steps}–${limits.max_steps}, guidance 0–${limits.max_cfg}`;
    this.setMode(modes.includes(this.mode) ? this.mode : modes[0], { force: first });
  }

  // The guidance each mode defaults to (FLUX.1-Fill wants 30, Redux 2.5): switching modes moves the field to the
  // new default unless the user typed their own value.
  defaultCfg(mode) {
    const defaults = this.model.defaults;
    return { fill: defaults.fill_cfg, redux: defaults.redux_cfg }[mode] ?? defaults.cfg;
  }

  setMode(mode, { force = false } = {}) {
    const previous = this.mode;
    this.mode = mode;
    const radio = this.form.querySelector(`input[name=mode][value="${mode}"]`);
    if (radio) radio.checked = true;
    if (force || Number(this.inputs.cfg.value) === this.defaultCfg(previous)) this.inputs.cfg.value = this.defaultCfg(mode);
    for (const element of this.form.querySelectorAll("[data-modes]")) {
      element.hidden = !element.dataset.modes.split(" ").includes(mode);
    }
    for (const optional of this.form.querySelectorAll("[data-optional-in]")) {
      optional.hidden = optional.dataset.optionalIn !== mode;
    }
    this.form.querySelector('[data-for="prompt"]').textContent = mode === "redux" ? "Optional: mixed into the image's embeddings." : "";
    this.updateStrength();
    this.formError.hidden = true;
  }

  // Strength means something only when there is an image to start from (img2img; ControlNet with an input image).
  updateStrength() {
    const used = this.mode === "img2img" || (this.mode === "controlnet" && this.images.input_image);
    this.form.querySelector("#strength-field").hidden = !used;
  }

  imageChanged(field, image) {
    this.images[field] = image;
    this.clearFieldError(field);
    if (field === "input_image") this.mask.setImage(image);
    this.updateStrength();
  }

  setLastSeed(seed) {
    this.lastSeed = seed;
    this.reuseButton.disabled = seed === null;
  }

  // Put a job's parameters (a history item's `params`) back into the form: "use these settings".
  applyParams(params) {
    if (this.model.modes.includes(params.mode)) this.setMode(params.mode, { force: true });
    for (const name of ["prompt", "width", "height", "num_inference_steps", "cfg", "priority", "strength", "controlnet_type"]) {
      const input = name === "controlnet_type" ? this.form.querySelector("#controlnet_type") : this.inputs[name];
      if (params[name] !== undefined && params[name] !== null) input.value = params[name];
    }
    this.inputs.strength.dispatchEvent(new Event("input"));
    if (params.seed !== undefined && params.seed !== null) this.inputs.seed.value = String(params.seed);
  }

  // --- validation -------------------------------------------------------------------------------------------

  validate() {
    const { limits } = this.model;
    const errors = {};
    const body = { mode: this.mode };
    const prompt = this.inputs.prompt.value.trim();
    if (!prompt && this.mode !== "redux") errors.prompt = "Write a prompt.";
    else if (prompt.length > limits.max_prompt_chars) errors.prompt = `At most ${limits.max_prompt_chars} characters.`;
    body.prompt = prompt;

    for (const name of ["width", "height"]) {
      const value = integer(this.inputs[name].value);
      if (value === null || value < limits.min_size || value > limits.max_size) {
        errors[name] = `A whole number from ${limits.min_size} to ${limits.max_size}.`;
      } else {
        body[name] = value;
      }
    }
    const steps = integer(this.inputs.num_inference_steps.value);
    if (steps === null || steps < limits.min_steps || steps > limits.max_steps) {
      errors.num_inference_steps = `A whole number from ${limits.min_steps} to ${limits.max_steps}.`;
    } else {
      body.num_inference_steps = steps;
    }
    const cfg = Number(this.inputs.cfg.value);
    if (this.inputs.cfg.value.trim() === "" || !Number.isFinite(cfg) || cfg < 0 || cfg > limits.max_cfg) {
      errors.cfg = `A number from 0 to ${limits.max_cfg}.`;
    } else {
      body.cfg = cfg;
    }
    const seed = this.inputs.seed.value.trim();
    if (seed === "") {
      body.seed = -1; // the server picks one and reports it
    } else if (!INT_PATTERN.test(seed) || BigInt(seed) < 0n || BigInt(seed) > BigInt(limits.max_seed)) {
      errors.seed = `A whole number from 0 to ${limits.max_seed}, or empty for a random seed.`;
    } else {
      body.seed = seedJson(BigInt(seed));
    }
    const priority = integer(this.inputs.priority.value);
    if (priority === null || priority < limits.min_priority || priority > limits.max_priority) {
      errors.priority = `A whole number from ${limits.min_priority} to ${limits.max_priority}.`;
    } else {
      body.priority = priority;
    }

    for (const field of REQUIRED_IMAGES[this.mode]) {
      if (!this.images[field]) errors[field] = "Choose or drop an image.";
    }
    for (const field of USED_IMAGES[this.mode]) {
      if (this.images[field]) body[field] = this.images[field].dataUrl;
    }
    if (this.mode === "fill" && this.images.input_image) {
      if (this.mask.isEmpty()) errors.mask_image = "Paint the area to repaint on the image.";
      else body.mask_image = this.mask.toDataUrl();
    }
    if (this.mode === "controlnet") body.controlnet_type = this.form.querySelector("#controlnet_type").value;
    if (!this.form.querySelector("#strength-field").hidden) {
      const strength = Number(this.inputs.strength.value);
      if (!(strength > 0 && strength <= 1)) errors.strength = "Greater than 0, at most 1.";
      else body.strength = strength;
    }
    return { body, errors };
  }

  submit() {
    this.clearErrors();
    if (!this.model) return;
    const { body, errors } = this.validate();
    if (Object.keys(errors).length) {
      for (const [field, message] of Object.entries(errors)) this.showFieldError(field, message);
      this.showFormError("Some fields need a fix before this can run.");
      return;
    }
    this.onSubmit(body);
  }

  // --- errors -----------------------------------------------------------------------------------------------

  // The server's message for a refused job: under the field it names when it names one (GenServe's messages start
  // with the field: "width must be between …"), and above the button either way.
  showServerError(message) {
    const field = FIELDS.find((name) => message.startsWith(`${name} `));
    if (field) this.showFieldError(field, message);
    this.showFormError(message);
  }

  showFormError(message) {
    this.formError.textContent = message;
    this.formError.hidden = false;
  }

  showFieldError(field, message) {
    const slot = this.form.querySelector(`[data-error-for="${field}"]`);
    if (slot) slot.textContent = message;
    this.inputs[field]?.setAttribute("aria-invalid", "true");
  }

  clearFieldError(field) {
    if (!field) return;
    const slot = this.form.querySelector(`[data-error-for="${field}"]`);
    if (slot) slot.textContent = "";
    this.inputs[field]?.removeAttribute("aria-invalid");
  }

  clearErrors() {
    FIELDS.forEach((field) => this.clearFieldError(field));
    this.formError.hidden = true;
  }

  setBusy(busy) {
    this.submitButton.disabled = busy;
  }
}

function integer(text) {
  const trimmed = String(text).trim();
  return INT_PATTERN.test(trimmed) ? Number(trimmed) : null;
}
