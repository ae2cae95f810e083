// Signaling client: one WebSocket to /ws speaking Callisto protocol v1
// (docs/protocol.md). It turns server messages into DOM events and keeps
// no call state of its own.

export const ROOM_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;

export class SignalingError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

export class SignalingClient extends EventTarget {
  #ws = null;
  #pendingJoin = null;
  #held = null; // outgoing messages held back by a test (see hold())
  id = null;

  /** Opens the socket; resolves once it is open. */
  connect(url = defaultUrl()) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, 'callisto.v1');
      this.#ws = ws;
      ws.addEventListener('open', () => resolve(), { once: true });
      ws.addEventListener('error', () => reject(new SignalingError('network', 'Cannot reach the server.')), { once: true });
      ws.addEventListener('message', (ev) => this.#onMessage(ev.data));
      ws.addEventListener('close', (ev) => {
        if (this.#ws !== ws) return;
        this.#ws = null;
        this.id = null;
        this.#pendingJoin?.reject(new SignalingError('closed', ev.reason || 'The connection to the server closed.'));
        this.#pendingJoin = null;
        this.dispatchEvent(new CustomEvent('close', { detail: { code: ev.code, reason: ev.reason } }));
      });
    });
  }

  /**
   * Joins a room; resolves with the welcome message. With the `resume`
   * token of an earlier welcome, takes back that place if the server still
   * keeps it (welcome.resumed), else joins as new. `access` is the
   * server's access code, for a server that needs one. In a locked room
   * it knocks: a "waiting" event, then the welcome once someone lets it
   * in, or a rejection with the code "not-admitted".
   */
  join(room, name, resume = null, access = null, watching = false) {
    return new Promise((resolve, reject) => {
      this.#pendingJoin = { resolve, reject };
      this.#send({ type: 'join', room, name, ...(resume && { resume }), ...(access && { access }), ...(watching && { watching }) });
    });
  }

  signal(to, data) { this.#send({ type: 'signal', to, data }); }
  broadcast(data) { this.#send({ type: 'broadcast', data }); }
  /**
   * Locks the room (newcomers knock) or unlocks it; locked
   * `openToAudience`, those who join to watch still come in.
   */
  lock(locked, openToAudience = false) { this.#send({ type: 'lock', locked, ...(openToAudience && { openToAudience }) }); }
  /** Lets in someone knocking. */
  admit(id) { this.#send({ type: 'admit', id }); }
  /** Turns away someone knocking. */
  deny(id) { this.#send({ type: 'deny', id }); }

  leave() {
    if (this.id) this.#send({ type: 'leave' });
    this.id = null;
  }

  /** Stops a join that knocks on a locked room: it rejects with the code "cancelled". */
  cancelJoin() {
    this.#send({ type: 'leave' });
    this.#pendingJoin?.reject(new SignalingError('cancelled', 'You stopped waiting.'));
    this.#pendingJoin = null;
    this.close();
  }

  close() {
    const ws = this.#ws;
    this.#ws = null;
    ws?.close(1000, 'bye');
  }

  get open() { return this.#ws?.readyState === WebSocket.OPEN; }

  /**
   * Holds outgoing messages back until hold(false). Tests use it to make two
   * peers' signals cross on the wire deterministically.
   */
  hold(on) {
    if (on) { this.#held ??= []; return; }
    const held = this.#held ?? [];
    this.#held = null;
    for (const msg of held) this.#send(msg);
  }

  #send(msg) {
    if (this.#held && msg.type === 'signal') { this.#held.push(msg); return; }
    if (this.#ws?.readyState === WebSocket.OPEN) this.#ws.send(JSON.stringify(msg));
  }

  #onMessage(text) {
    let msg;
    try { msg = JSON.parse(text); } catch { console.warn('signaling: server sent non-JSON'); return; }
    switch (msg.type) {
      case 'welcome':
        this.id = msg.id;
        this.#pendingJoin?.resolve(msg);
        this.#pendingJoin = null;
        break;
      case 'error':
        if (this.#pendingJoin && ['room-full', 'server-full', 'bad-room', 'bad-name', 'already-joined', 'access-denied', 'not-admitted', 'bad-message'].includes(msg.code)) {
          this.#pendingJoin.reject(new SignalingError(msg.code, msg.message));
          this.#pendingJoin = null;
        } else {
          this.dispatchEvent(new CustomEvent('error', { detail: msg }));
        }
        break;
      case 'peer-joined':
      case 'peer-left':
      case 'signal':
      case 'broadcast':
      case 'ice-servers':
      case 'pong':
      case 'waiting':
      case 'knock':
      case 'knock-ended':
      case 'locked':
        this.dispatchEvent(new CustomEvent(msg.type, { detail: msg }));
        break;
      default:
        console.debug('signaling: ignoring unknown message type', msg.type);
    }
  }
}

function defaultUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/ws`;
}
