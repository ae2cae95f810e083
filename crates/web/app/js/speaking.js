// Who is speaking: the tile of each person whose microphone is loud just
// now is marked, ours too, so a glance tells who talks and that our own
// microphone works; and whoever talks while muted is told so. Others'
// levels come with their audio: browsers put each packet's level in an
// RTP header extension (RFC 6464), which getSynchronizationSources()
// reads (peer.js), with no decoding and no audio graph per person. Ours
// comes from an analyser on the microphone, muted or not; it never
// leaves the page.

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

/** Talk this long (first to last loud moment, ms) while muted is told. */
export const MUTED_TALK_MS = 500;
/** Within this long (ms): a door slam is not talk. */
export const MUTED_TALK_WINDOW_MS = 2000;
/** After telling, quiet for this long (ms), however long the talk goes on. */
export const MUTED_TALK_AGAIN_MS = 20000;

/**
 * Whether we talk while muted: loud moments at least MUTED_TALK_MS apart
 * within MUTED_TALK_WINDOW_MS, then not again for MUTED_TALK_AGAIN_MS.
 */
export class MutedTalk {
  #loud = [];
  #toldAt = -Infinity;

  /** Takes our level at `now` (ms), muted; true when it is time to tell. */
  update(level, now) {
    this.#loud = this.#loud.filter((t) => now - t < MUTED_TALK_WINDOW_MS);
    if (level > SPEECH_LEVEL) this.#loud.push(now);
    if (this.#loud.length === 0 || now - this.#toldAt < MUTED_TALK_AGAIN_MS) return false;
    if (this.#loud.at(-1) - this.#loud[0] < MUTED_TALK_MS) return false;
    this.#toldAt = now;
    this.#loud = [];
    return true;
  }

  /** Unmuted: what was heard before no longer counts. */
  reset() {
    this.#loud = [];
  }
}

/**
 * The level of a local microphone track: the RMS of the last few
 * milliseconds, 0–1, heard through a copy of the track that stays on when
 * the track is muted (disabled). Its audio context starts at the first
 * reading, and resumes at the next click if the browser held it back (no
 * gesture yet).
 */
export class MicLevel {
  #context = null;
  #source = null;
  #track = null;
  #copy = null;
  #analyser = null;
  #samples = null;

  /** The level of `track` now, muted or not (0 without a track). */
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
      this.release();
      this.#track = track;
      this.#copy = track.clone();
      this.#copy.enabled = true;
      this.#analyser = this.#context.createAnalyser();
      this.#analyser.fftSize = 1024;
      this.#samples = new Float32Array(this.#analyser.fftSize);
      this.#source = this.#context.createMediaStreamSource(new MediaStream([this.#copy]));
      this.#source.connect(this.#analyser);
    }
    this.#analyser.getFloatTimeDomainData(this.#samples);
    let sum = 0;
    for (const s of this.#samples) sum += s * s;
    return Math.sqrt(sum / this.#samples.length);
  }

  /** Lets the microphone and the audio context go. */
  close() {
    this.release();
    this.#context?.close();
    this.#context = null;
  }

  /**
   * Lets go of the copy of the track measured, which holds the microphone
   * open: before it is opened again with other processing, which Chromium
   * would not apply while a track of it lives. The next reading takes a
   * new copy.
   */
  release() {
    this.#source?.disconnect();
    this.#copy?.stop();
    this.#source = null;
    this.#copy = null;
    this.#track = null;
  }
}
