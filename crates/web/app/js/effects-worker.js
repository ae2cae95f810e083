// The worker of effects.js: reads the camera's frames, draws each with the
// effect chosen on a canvas, and writes the result to the track sent.
// Frames keep their timestamps, so the encoder paces them as the camera
// did. With 'none' a frame passes through untouched (no copy).

/** How each effect draws a frame of width w and height h on ctx. */
const DRAW = {
  // Blurring at a quarter of the size and scaling back up blurs as much
  // for a sixteenth of the work, which keeps 720p at 30 fps on a CPU.
  blur(ctx, frame, w, h) {
    const small = smallCanvas(Math.max(1, Math.round(w / 4)), Math.max(1, Math.round(h / 4)));
    const sctx = small.getContext('2d');
    // Unblurred first: the blur fades to transparent at the edges.
    sctx.filter = 'none';
    sctx.drawImage(frame, 0, 0, small.width, small.height);
    sctx.filter = `blur(${Math.max(2, Math.round(w / 320))}px)`;
    sctx.drawImage(frame, 0, 0, small.width, small.height);
    ctx.filter = 'none';
    ctx.imageSmoothingQuality = 'low';
    ctx.drawImage(small, 0, 0, w, h);
  },
  brighten(ctx, frame, w, h) {
    ctx.filter = 'brightness(1.6) contrast(1.1)';
    ctx.drawImage(frame, 0, 0, w, h);
  },
  mono(ctx, frame, w, h) {
    ctx.filter = 'grayscale(1)';
    ctx.drawImage(frame, 0, 0, w, h);
  },
};

let effect = 'none';
let canvas = null;
let small = null;

function smallCanvas(w, h) {
  if (small?.width !== w || small?.height !== h) small = new OffscreenCanvas(w, h);
  return small;
}

self.addEventListener('message', ({ data }) => {
  if (typeof data?.effect === 'string') effect = data.effect in DRAW ? data.effect : 'none';
  if (data?.readable && data?.writable) run(data.readable, data.writable);
});

async function run(readable, writable) {
  const effects = new TransformStream({
    transform(frame, controller) {
      const draw = DRAW[effect];
      if (!draw) return controller.enqueue(frame);
      try {
        const w = frame.displayWidth;
        const h = frame.displayHeight;
        if (canvas?.width !== w || canvas?.height !== h) canvas = new OffscreenCanvas(w, h);
        draw(canvas.getContext('2d', { alpha: false }), frame, w, h);
        controller.enqueue(new VideoFrame(canvas, { timestamp: frame.timestamp, duration: frame.duration ?? undefined }));
        frame.close();
      } catch (err) {
        // The camera as it is, from now on, rather than no picture.
        effect = 'none';
        self.postMessage({ failed: `${err.name}: ${err.message}` });
        controller.enqueue(frame);
      }
    },
  });
  try {
    await readable.pipeThrough(effects).pipeTo(writable);
  } catch {
    // The camera stopped or the sent track was let go: nothing to do.
  }
}
