// DOM for the call: the grid of video tiles and small helpers for views,
// notices and sizes. Knows nothing about WebRTC or signaling.

const $ = (id) => document.getElementById(id);
export { $ };

/** Shows one <main class="view"> and hides the others. */
export function showView(id) {
  for (const view of document.querySelectorAll('main.view')) view.hidden = view.id !== id;
}

/** Sets (or clears, with null) the text of a notice or error paragraph. */
export function setText(id, text) {
  const el = $(id);
  el.textContent = text ?? '';
  el.hidden = !text;
}

/**
 * A button that says `text` and is named `label` for screen readers (a
 * "Let in" among several says whom).
 */
export function button(text, label, className = '') {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = text;
  b.setAttribute('aria-label', label);
  if (className) b.className = className;
  return b;
}

/** A size in bytes as people read it: "1.5 MB". */
export function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  const units = ['KB', 'MB', 'GB'];
  let n = bytes / 1024;
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

export class Grid {
  #tiles = new Map();
  #sinkId = null;
  #pinned = null;

  constructor(root) {
    this.root = root;
    document.addEventListener('fullscreenchange', () => {
      for (const tile of this.#tiles.values()) this.#label(tile);
    });
  }

  /**
   * Adds or updates the tile for `id` and returns it: someone's camera, or
   * with `screen` the screen they share, placed right after the tile
   * `beside` (theirs) if there is one.
   */
  tile(id, { name, local = false, screen = false, beside = null }) {
    let tile = this.#tiles.get(id);
    if (!tile) {
      tile = document.createElement('figure');
      tile.className = ['tile', local && 'local', screen && 'screen'].filter(Boolean).join(' ');
      tile.dataset.peerId = id;
      const video = document.createElement('video');
      video.autoplay = true;
      video.playsInline = true;
      video.muted = local; // never play our own microphone back
      if (!local && this.#sinkId) video.setSinkId(this.#sinkId).catch(() => {});
      const avatar = document.createElement('div');
      avatar.className = 'avatar';
      avatar.setAttribute('aria-hidden', 'true');
      const caption = document.createElement('figcaption');
      const label = document.createElement('span');
      label.className = 'name';
      const muted = document.createElement('span');
      muted.className = 'badge muted';
      muted.textContent = 'Muted';
      muted.hidden = true;
      const camOff = document.createElement('span');
      camOff.className = 'badge camera';
      camOff.textContent = 'Camera off';
      camOff.hidden = true;
      const hand = document.createElement('span');
      hand.className = 'badge hand';
      hand.textContent = 'Hand raised';
      hand.hidden = true;
      caption.append(label, hand, muted, camOff);
      const state = document.createElement('span');
      state.className = 'state';
      state.hidden = true;
      // Shown on hover and focus; reached by Tab like any button.
      const actions = document.createElement('div');
      actions.className = 'tile-actions';
      const pin = button('Pin', '', 'pin');
      pin.setAttribute('aria-pressed', 'false');
      pin.addEventListener('click', () => this.pin(this.#pinned === tile.dataset.peerId ? null : tile.dataset.peerId));
      const full = button('Full screen', '', 'full');
      full.addEventListener('click', () => this.#toggleFullscreen(tile));
      video.addEventListener('dblclick', () => this.#toggleFullscreen(tile));
      actions.append(pin, full);
      tile.append(video, avatar, caption, state, actions);
      const neighbour = beside && this.#tiles.get(beside);
      if (neighbour) neighbour.after(tile);
      else this.root.append(tile);
      this.#tiles.set(id, tile);
      this.#layout();
    }
    const who = local ? `${name} (you)` : name;
    const label = screen ? `Screen of ${who}` : who;
    tile.querySelector('.name').textContent = label;
    tile.querySelector('.avatar').textContent = (name || '?').trim().charAt(0).toUpperCase();
    tile.setAttribute('aria-label', label);
    this.#label(tile);
    return tile;
  }

  /** Whether there is a tile for `id`. */
  has(id) { return this.#tiles.has(id); }

  /** The pinned tile's id, or null. */
  get pinned() { return this.#pinned; }

  /**
   * Shows the tile of `id` large, the others in a column beside it; null
   * puts them all back in the grid.
   */
  pin(id) {
    this.#pinned = id !== null && this.#tiles.has(id) ? id : null;
    for (const [tileId, tile] of this.#tiles) {
      tile.classList.toggle('pinned', tileId === this.#pinned);
      this.#label(tile);
    }
    this.#layout();
  }

  /** The names and states of a tile's buttons, which say whose tile they act on. */
  #label(tile) {
    const who = tile.getAttribute('aria-label') ?? '';
    const pinned = tile.classList.contains('pinned');
    const pin = tile.querySelector('.tile-actions .pin');
    pin.textContent = pinned ? 'Unpin' : 'Pin';
    pin.setAttribute('aria-label', pinned ? `Unpin ${who}` : `Pin ${who}: show it large`);
    pin.setAttribute('aria-pressed', String(pinned));
    const full = document.fullscreenElement === tile;
    const fullButton = tile.querySelector('.tile-actions .full');
    fullButton.textContent = full ? 'Exit full screen' : 'Full screen';
    fullButton.setAttribute('aria-label', full ? 'Exit full screen' : `Show ${who} full screen`);
    fullButton.hidden = !document.fullscreenEnabled;
  }

  #toggleFullscreen(tile) {
    if (!document.fullscreenEnabled) return; // an iPhone's Safari: no element full screen
    const done = document.fullscreenElement === tile ? document.exitFullscreen() : tile.requestFullscreen();
    done.catch((err) => console.warn(`full screen refused: ${err.message}`));
  }

  /** The tile of `old`, if any, goes by `id` from now on (its place and stream stay). */
  rename(old, id) {
    const tile = this.#tiles.get(old);
    if (!tile) return;
    this.#tiles.delete(old);
    this.#tiles.set(id, tile);
    tile.dataset.peerId = id;
    if (this.#pinned === old) this.#pinned = id;
  }

  /** Plays `stream` in the tile (null: nothing); offers a button if autoplay is refused. */
  attach(id, stream) {
    const tile = this.#tiles.get(id);
    if (!tile) return;
    const video = tile.querySelector('video');
    if (!stream) {
      video.srcObject = null;
      return;
    }
    if (video.srcObject !== stream) video.srcObject = stream;
    video.play().catch(() => {
      if (tile.querySelector('.play')) return;
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'play';
      button.textContent = 'Play audio and video';
      button.addEventListener('click', () => video.play().then(() => button.remove(), () => {}));
      tile.append(button);
    });
  }

  /** The speaker remote tiles play on (null: the system's default). */
  get sinkId() { return this.#sinkId; }

  /** Plays every remote tile, and those to come, on the speaker `sinkId`. */
  async setSink(sinkId) {
    this.#sinkId = sinkId;
    const remote = [...this.#tiles.values()].filter((t) => !t.classList.contains('local'));
    await Promise.all(remote.map((t) => t.querySelector('video').setSinkId(sinkId)));
  }

  /** Shows remote mute and camera state on the tile. */
  setMediaState(id, { audio = true, video = true } = {}) {
    const tile = this.#tiles.get(id);
    if (!tile) return;
    tile.querySelector('.badge.muted').hidden = audio;
    tile.querySelector('.badge.camera').hidden = video;
    tile.classList.toggle('camera-off', !video);
  }

  /** Shows whether someone's hand is raised; true if that changed. */
  setHand(id, raised) {
    const badge = this.#tiles.get(id)?.querySelector('.badge.hand');
    if (!badge || badge.hidden === !raised) return false;
    badge.hidden = !raised;
    return true;
  }

  /** Marks the tile of someone speaking, or unmarks it. */
  setSpeaking(id, on) {
    this.#tiles.get(id)?.classList.toggle('speaking', on);
  }

  /** Shows (or with null, hides) live stats on the tile: [label, value] lines. */
  setStats(id, lines) {
    const tile = this.#tiles.get(id);
    if (!tile) return;
    let box = tile.querySelector('.stats');
    if (!lines) {
      box?.remove();
      return;
    }
    if (!box) {
      box = document.createElement('dl');
      box.className = 'stats';
      box.setAttribute('aria-label', 'Connection stats');
      tile.append(box);
    }
    box.replaceChildren(...lines.flatMap(([label, value]) => {
      const dt = document.createElement('dt');
      dt.textContent = label;
      const dd = document.createElement('dd');
      dd.textContent = value;
      return [dt, dd];
    }));
  }

  /** Shows a connection state other than "connected" on the tile. */
  setConnectionState(id, state) {
    const el = this.#tiles.get(id)?.querySelector('.state');
    if (!el) return;
    el.textContent = state === 'connected' ? '' : state;
    el.hidden = state === 'connected';
  }

  remove(id) {
    const tile = this.#tiles.get(id);
    if (!tile) return;
    tile.querySelector('video').srcObject = null;
    if (document.fullscreenElement === tile) document.exitFullscreen().catch(() => {});
    tile.remove();
    this.#tiles.delete(id);
    if (this.#pinned === id) this.pin(null);
    else this.#layout();
  }

  clear() {
    for (const id of [...this.#tiles.keys()]) this.remove(id);
  }

  get size() { return this.#tiles.size; }

  #layout() {
    // Enough columns (or, beside a pinned tile, rows) that every tile fits
    // on screen: Chromium pauses off-screen autoplaying video.
    const n = Math.max(1, this.#tiles.size);
    this.root.style.setProperty('--cols', String(Math.ceil(Math.sqrt(n))));
    this.root.style.setProperty('--rows', String(Math.max(1, n - 1)));
    this.root.classList.toggle('has-pinned', this.#pinned !== null && n > 1);
  }
}
