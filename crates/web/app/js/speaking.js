// Who is speaking: the tile of each person whose microphone is loud just
// now is marked, ours too, so a glance tells who talks and that our own
// microphone works. Others' levels come with their audio: browsers put
// each packet's level in an RTP header extension (RFC 6464), which
// getSynchronizationSources() reads (peer.js), with no decoding and no
// audio graph per person. Ours comes from an analyser on the microphone
// sent.

/** A level (0–1, linear; 1 is full scale) above this is speech: about -30 dBov. */
export const SPEECH_LEVEL = 0.03;
/**
 * How long a tile stays marked after the last loud moment: speech has
 * pauses between words, and a mark that blinks with them is noise.
 */
export const HOLD_MS = 700;

/** Whether each person speaks, from levels sampled over time. */
export class Speaking {
  #lastLoud = new Map();
  #marked = new Set();

  /**
   * Takes `id`'s level at `now` (ms; null: unknown, as silence); returns
   * true or false when whether they speak changes, else undefined.
   */
  update(id, level, now) {
    if (level !== null && level > SPEECH_LEVEL) this.#lastLoud.set(id, now);
    const last = this.#lastLoud.get(id);
    const speaking = last !== undefined && now - last < HOLD_MS;
    if (speaking === this.#marked.has(id)) return undefined;
    if (speaking) this.#marked.add(id);
    else this.#marked.delete(id);
    return speaking;
  }

  /** Forgets `id` (gone, or known by another id from now on). */
  forget(id) {
    this.#lastLoud.delete(id);
    this.#marked.delete(id);
  }
}

/**
 * The level of a local microphone track: the RMS of the last few
 * milliseconds, 0–1. Its audio context starts at the first reading, and
 * resumes at the next click if the browser held it back (no gesture yet).
 */
export class MicLevel {
  #context = null;
  #source = null;
  #track = null;
  #analyser = null;
  #samples = null;

  /** The level of `track` now (0 without a track). */
  level(track) {
    if (!track || track.readyState !== 'live') return 0;
    if (!this.#context) {
      if (typeof AudioContext !== 'function') return 0;
      this.#context = new AudioContext();
      if (this.#context.state !== 'running') {
        document.addEventListener('click', () => this.#context?.resume().catch(() => {}), { once: true, capture: true });
      }
    }
    if (track !== this.#track) {
      this.#source?.disconnect();
      this.#track = track;
      this.#analyser = this.#context.createAnalyser();
      this.#analyser.fftSize = 1024;
      this.#samples = new Float32Array(this.#analyser.fftSize);
      this.#source = this.#context.createMediaStreamSource(new MediaStream([track]));
      this.#source.connect(this.#analyser);
    }
    this.#analyser.getFloatTimeDomainData(this.#samples);
    let sum = 0;
    for (const s of this.#samples) sum += s * s;
    return Math.sqrt(sum / this.#samples.length);
  }

  /** Lets the microphone and the audio context go. */
  close() {
    this.#source?.disconnect();
    this.#context?.close();
    this.#context = null;
    this.#source = null;
    this.#track = null;
  }
}
