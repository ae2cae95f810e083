// Video effects: the camera's picture changed before it is sent and shown
// here (blurred, brightened for a dark room, black and white). The frames
// go through a worker (effects-worker.js), off the page's thread, so a busy
// page does not stall the video and a hidden tab keeps sending it.
//
// With no effect the camera's own track is sent, untouched. The first
// effect puts a processed track in its place (one replaceTrack, no
// renegotiation); changing effects after that only tells the worker.
//
// This needs Chromium's MediaStreamTrackProcessor and Generator on the
// page; other browsers get no effects, and the Devices dialog says so.
// A background blur (the person sharp, the room blurred) needs a
// segmentation model, which the app does not ship: see the notes.

import { store, stored } from './storage.js';

export const EFFECTS = [
  { id: 'none', label: 'None' },
  { id: 'blur', label: 'Blur everything' },
  { id: 'brighten', label: 'Brighten (low light)' },
  { id: 'mono', label: 'Black and white' },
];
const EFFECT_KEY = 'callisto.videoEffect';

export const canApplyEffects = typeof MediaStreamTrackProcessor === 'function'
  && typeof MediaStreamTrackGenerator === 'function'
  && typeof OffscreenCanvas === 'function'
  && typeof Worker === 'function';

/** The effect chosen in this browser ('none' if none, or if this browser cannot). */
export function chosenEffect() {
  const id = stored(EFFECT_KEY);
  return canApplyEffects && EFFECTS.some((e) => e.id === id) ? id : 'none';
}

/**
 * The camera tracks this page sends with an effect, each with the camera
 * behind it and the worker between them.
 */
export class CameraEffects extends EventTarget {
  #pipes = new Map(); // sent track -> { camera, worker }

  constructor() {
    super();
    this.effect = chosenEffect();
  }

  /** The track to send for a newly started `camera`: itself, or with the effect. */
  wrap(camera) {
    if (this.effect === 'none' || camera.kind !== 'video') return camera;
    try {
      return this.#pipe(camera);
    } catch (err) {
      // Sending the camera as it is beats sending nothing.
      this.#failed(err.message);
      return camera;
    }
  }

  /** The camera behind a sent track (the track itself without an effect). */
  camera(track) {
    return this.#pipes.get(track)?.camera ?? track;
  }

  /**
   * Chooses effect `id` (kept in this browser) for `sent`, the camera's
   * track being sent, if any. Resolves to the track to send from now on:
   * `sent` itself when only the worker needed telling, else one that
   * replaces it (then `release(sent, next)` lets the old one go).
   */
  choose(id, sent) {
    if (!EFFECTS.some((e) => e.id === id)) return sent;
    this.effect = id;
    store(EFFECT_KEY, id);
    if (!sent) return null;
    const pipe = this.#pipes.get(sent);
    if (pipe && id !== 'none') {
      pipe.worker.postMessage({ effect: id });
      return sent;
    }
    if (pipe) return pipe.camera;
    return this.wrap(sent);
  }

  /**
   * Lets `old` go once `next` is sent in its place: its worker, and its
   * camera unless `next` still uses it.
   */
  release(old, next = null) {
    if (!old) return;
    const keep = this.camera(next);
    const pipe = this.#pipes.get(old);
    this.#pipes.delete(old);
    pipe?.worker.terminate();
    if (old !== keep) old.stop();
    if (pipe && pipe.camera !== keep) pipe.camera.stop();
  }

  /** Turns a sent track on or off, and its camera with it. */
  setEnabled(track, on) {
    track.enabled = on;
    this.camera(track).enabled = on;
  }

  #pipe(camera) {
    const processor = new MediaStreamTrackProcessor({ track: camera });
    const generator = new MediaStreamTrackGenerator({ kind: 'video' });
    const worker = new Worker('/js/effects-worker.js', { type: 'module' });
    worker.addEventListener('message', ({ data }) => {
      if (data?.failed) this.#failed(data.failed);
    });
    worker.addEventListener('error', (ev) => this.#failed(ev.message || 'the worker could not start'));
    worker.postMessage({ effect: this.effect, readable: processor.readable, writable: generator.writable }, [processor.readable, generator.writable]);
    generator.enabled = camera.enabled;
    generator.contentHint = camera.contentHint;
    this.#pipes.set(generator, { camera, worker });
    return generator;
  }

  #failed(why) {
    console.warn('video effect failed:', why);
    this.dispatchEvent(new CustomEvent('failed', { detail: { message: `The video effect stopped working (${why}). Choose None in Devices to send the camera as it is.` } }));
  }
}
