// The fill mask painter: a canvas laid over the input image, painted with the mouse (or a pen or a finger).
//
// The canvas has the input image's own pixel size, whatever size it is shown at, so the mask it exports is exactly
// the size the server requires (mask_image must match input_image). On screen the strokes are a translucent red
// over the picture; the exported PNG is white where painted (repaint) and black elsewhere (keep), as FLUX.1-Fill
// and the API expect.

const STROKE_COLOR = "rgb(255, 48, 48)"; // shown at the canvas's CSS opacity; only its alpha matters on export

export class MaskPainter {
  constructor({ stage, canvas, background, brushSize, brushSizeValue, toolRadios, clearButton, invertButton }) {
    this.stage = stage;
    this.canvas = canvas;
    this.background = background;
    this.brushSize = brushSize;
    this.context = canvas.getContext("2d", { willReadFrequently: true });
    this.tool = "paint";
    this.last = null; // the previous point of the stroke being drawn, in canvas pixels

    brushSize.addEventListener("input", () => {
      brushSizeValue.textContent = brushSize.value;
    });
    for (const radio of toolRadios) {
      radio.addEventListener("change", () => {
        if (radio.checked) this.tool = radio.value;
      });
    }
    clearButton.addEventListener("click", () => this.clear());
    invertButton.addEventListener("click", () => this.invert());
    canvas.addEventListener("pointerdown", (event) => this.start(event));
    canvas.addEventListener("pointermove", (event) => this.move(event));
    canvas.addEventListener("pointerup", () => this.end());
    canvas.addEventListener("pointercancel", () => this.end());
  }

  // A new input image: the mask starts empty, at the image's size.
  setImage(image) {
    this.canvas.width = image ? image.width : 0;
    this.canvas.height = image ? image.height : 0;
    if (image) this.background.src = image.dataUrl;
    else this.background.removeAttribute("src");
    this.clear();
  }

  clear() {
    this.context.clearRect(0, 0, this.canvas.width, this.canvas.height);
  }

  // Painted becomes kept and kept becomes painted: "repaint everything but this" in two clicks.
  invert() {
    const { width, height } = this.canvas;
    if (!width || !height) return;
    const pixels = this.context.getImageData(0, 0, width, height);
    const data = pixels.data;
    for (let i = 0; i < data.length; i += 4) {
      data[i] = 255;
      data[i + 1] = 48;
      data[i + 2] = 48;
      data[i + 3] = 255 - data[i + 3];
    }
    this.context.putImageData(pixels, 0, 0);
  }

  isEmpty() {
    const { width, height } = this.canvas;
    if (!width || !height) return true;
    const data = this.context.getImageData(0, 0, width, height).data;
    for (let i = 3; i < data.length; i += 4) {
      if (data[i] > 0) return false;
    }
    return true;
  }

  // The mask as a PNG data: URI at the input image's size: white where painted, black elsewhere.
  toDataUrl() {
    const { width, height } = this.canvas;
    const source = this.context.getImageData(0, 0, width, height).data;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const outContext = out.getContext("2d");
    const pixels = outContext.createImageData(width, height);
    for (let i = 0; i < source.length; i += 4) {
      const value = source[i + 3] >= 128 ? 255 : 0; // the stroke's soft edge: half covered or more counts
      pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = value;
      pixels.data[i + 3] = 255;
    }
    outContext.putImageData(pixels, 0, 0);
    return out.toDataURL("image/png");
  }

  // Where a pointer event falls, in canvas (image) pixels, and how many image pixels one screen pixel covers.
  locate(event) {
    const rect = this.canvas.getBoundingClientRect();
    const scale = this.canvas.width / rect.width;
    return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
  }

  start(event) {
    if (!this.canvas.width) return;
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId); // keep the stroke when the pointer leaves the canvas
    this.last = this.locate(event);
    this.stroke(this.last, this.last);
  }

  move(event) {
    if (!this.last) return;
    const point = this.locate(event);
    this.stroke(this.last, point);
    this.last = point;
  }

  end() {
    this.last = null;
  }

  stroke(from, to) {
    const context = this.context;
    // The brush size is in screen pixels, so it feels the same whatever size the image is shown at.
    context.lineWidth = Number(this.brushSize.value) * to.scale;
    context.lineCap = "round";
    context.lineJoin = "round";
    context.strokeStyle = STROKE_COLOR;
    context.globalCompositeOperation = this.tool === "erase" ? "destination-out" : "source-over";
    context.beginPath();
    if (from.x === to.x && from.y === to.y) {
      // A click without a drag: a round dot (a zero-length line may draw nothing).
      context.fillStyle = STROKE_COLOR;
      context.arc(to.x, to.y, context.lineWidth / 2, 0, 2 * Math.PI);
      context.fill();
      return;
    }
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
  }
}
