// One RTCPeerConnection to one remote peer, negotiated with the "perfect
// negotiation" pattern: when offers cross (glare) the polite side rolls back
// and the impolite side ignores the other's offer. Roles come from comparing
// peer ids, so both sides agree without talking about it.
//
// Rollback is kept for safety but avoided by design: after a rollback
// Chromium (148) stops feeding the rolled-back side's receiver tracks (the
// remote video freezes while frames are still decoded) and its senders.
// So ICE restarts, the only renegotiation after the first offer, are made
// by the impolite side alone; the polite side asks for one with
// { restart: true }. Both sides restarting at once then gives one offer.
//
// Signals on the wire: { description } (an SDP offer or answer),
// { candidate } (a trickled ICE candidate), { restart } (please restart
// ICE) and { resend } (please send your outstanding offer again: it may
// have been lost with a signaling connection); { state } carries mute
// state and whether a screen is shared.
//
// Every connection carries audio (the microphone), video (the camera), and
// a second video and a second audio for a shared screen and its sound,
// all negotiated "sendrecv" from the first offer, also for what this side
// has nothing to send yet: starting a camera or sharing a screen later is
// a replaceTrack, never a renegotiation. The screen's are the second
// video and the second audio transceiver on both sides: the answerer's
// follow the offer's m-lines, in the order the offerer made them. (With
// an app from before screen sound, a connection has no second audio, and
// the screen goes without its sound.)
//
// With someone who only watches (docs/protocol.md, "Watching"), media
// goes one way: the watching side's sections are "recvonly", the other
// side's "sendonly", in offers and answers alike, so that nothing from
// an audience is ever played, whatever its browser sends.
//
// The side that offers first also opens the chat data channel (chat.js),
// so it is in the first offer and needs no renegotiation; the other side
// takes it from the "datachannel" event. Each file sent (files.js) gets a
// channel of its own, opened by its sender.

import { CHAT_LABEL, CHAT_PROTOCOL, ChatError, decodeChannelMessage, encodeMoved, encodeMovedAck } from './chat.js';
import { FILE_LABEL, FILE_PROTOCOL } from './files.js';
import { capSender } from './bitrate.js';

// Chat messages held for a channel that is not open yet, at most.
const MAX_CHAT_QUEUE = 100;
// How long a "moved" waits for its answer: a peer that let us go (it saw
// us leave) has closed its end, and never answers.
const MOVED_ACK_MS = 2000;
// Files a peer may offer us at once (each on a channel of its own); more
// channels are closed, so a peer cannot pile them up.
const MAX_INCOMING_FILES = 8;

export class PeerLink extends EventTarget {
  #makingOffer = false;
  #ignoreOffer = false;
  #settingRemoteAnswer = false;
  #localAttached = false;
  #restartTimer = null;
  #resendTimer = null;
  #chat = null;
  #chatQueue = [];
  #movedAcks = new Map(); // our new id -> resolves the sendMoved waiting for its answer
  #incomingFiles = new Set();
  #screen = null; // the shared screen's track, to send on the screen transceiver
  #screenAudio = null; // and its sound, if shared with it
  #caps = null; // what each video may carry to this peer (bitrate.js), once told
  #capping = Promise.resolve();
  glares = 0;

  /**
   * @param {object} o
   * @param {string} o.id remote peer id
   * @param {string} o.name remote display name
   * @param {boolean} o.polite whether this side yields in glare
   * @param {RTCIceServer[]} o.iceServers
   * @param {MediaStream|null} o.localStream
   * @param {(data: object) => void} o.send sends a signal to the remote peer
   * @param {'sendrecv'|'recvonly'|'sendonly'} [o.direction] the media's:
   *   'recvonly' when we watch, 'sendonly' to someone who watches
   */
  constructor({ id, name, polite, iceServers, localStream, send, direction = 'sendrecv' }) {
    super();
    this.id = id;
    this.name = name;
    this.polite = polite;
    this.direction = direction;
    this.localStream = localStream;
    this.send = send;
    this.remoteStream = new MediaStream();
    /** The other side's shared screen (its track is silent until it shares). */
    this.screenStream = new MediaStream();
    this.pc = new RTCPeerConnection({ iceServers });

    this.pc.addEventListener('negotiationneeded', () => this.#offer());
    this.pc.addEventListener('icecandidate', ({ candidate }) => {
      if (candidate) this.send({ candidate: candidate.toJSON() });
    });
    this.pc.addEventListener('track', ({ track, transceiver }) => {
      const screen = transceiver === this.#screenTransceiver() || transceiver === this.#screenTransceiver('audio');
      const stream = screen ? this.screenStream : this.remoteStream;
      stream.addTrack(track);
      track.addEventListener('ended', () => stream.removeTrack(track));
      this.dispatchEvent(new CustomEvent('track', { detail: { track, screen } }));
    });
    this.pc.addEventListener('connectionstatechange', () => this.#onState());
    // A sender's parameters exist once negotiated: caps told before wait.
    this.pc.addEventListener('signalingstatechange', () => {
      if (this.pc.signalingState === 'stable') this.#applyCaps();
    });
    this.pc.addEventListener('datachannel', ({ channel }) => this.#takeChannel(channel));
  }

  /**
   * Starts the call from this side: sends our media (or asks to receive
   * only) and so triggers the first offer. The other side waits for it.
   */
  start() {
    this.#attachLocal();
    this.#takeChannel(this.pc.createDataChannel(CHAT_LABEL, { protocol: CHAT_PROTOCOL }));
    const kinds = new Set(this.pc.getTransceivers().map((t) => t.receiver.track.kind));
    // A kind we have no track for is still negotiated to send (see the
    // top of this file), and so are the screen and its sound, after the
    // camera and microphone.
    const direction = this.direction;
    for (const kind of ['audio', 'video']) {
      if (!kinds.has(kind)) this.pc.addTransceiver(kind, { direction });
    }
    this.pc.addTransceiver(this.#screen ?? 'video', { direction });
    this.pc.addTransceiver(this.#screenAudio ?? 'audio', { direction });
    for (const t of this.pc.getTransceivers()) t.direction = direction;
  }

  /**
   * Sends `track`, a shared screen, beside the camera, and `audio`, its
   * sound, beside the microphone; null stops. Takes effect at once on a
   * connection already negotiated, and from the first offer or answer on
   * a new one.
   * @param {MediaStreamTrack|null} track
   * @param {MediaStreamTrack|null} [audio]
   */
  async sendScreen(track, audio = null) {
    this.#screen = track;
    this.#screenAudio = audio;
    await this.#sendScreenTracks();
  }

  /** Puts the screen's tracks (or none) on its transceivers, where they are not yet. */
  async #sendScreenTracks() {
    for (const [kind, track] of [['video', this.#screen], ['audio', this.#screenAudio]]) {
      const sender = this.#screenTransceiver(kind)?.sender;
      if (!sender || sender.track === track) continue;
      try {
        await sender.replaceTrack(track);
      } catch (err) {
        console.warn(`peer ${this.id}: could not switch the screen's ${kind} sent`, err);
      }
    }
  }

  async handleSignal(data) {
    if (data.description) {
      await this.#onDescription(data.description);
    } else if (data.restart) {
      if (!this.polite) this.pc.restartIce();
    } else if (data.resend) {
      // The local description holds the candidates gathered so far, so
      // the offer goes again whole, trickled candidates included.
      if (this.pc.signalingState === 'have-local-offer') this.send({ description: this.pc.localDescription.toJSON() });
    } else if (data.candidate) {
      try {
        await this.pc.addIceCandidate(data.candidate);
      } catch (err) {
        // Candidates for an offer we ignored in glare are expected to fail.
        if (!this.#ignoreOffer) console.warn(`peer ${this.id}: bad ICE candidate`, err);
      }
    }
  }

  /**
   * Restarts ICE after a failure (and in tests): the impolite side offers,
   * the polite side asks it to, so two restarts at once cannot collide.
   */
  renegotiate() {
    if (this.polite) this.send({ restart: true });
    else this.pc.restartIce();
  }

  /**
   * Waits for the other side's first offer, and asks for it again if it
   * has not come within a while: after a resumed signaling connection, an
   * offer sent before the server noticed the old one was lost is gone.
   * @param {number} ms how long to wait before each of three requests
   */
  expectOffer(ms = 1500) {
    let asked = 0;
    const check = () => {
      if (this.pc.remoteDescription || this.pc.signalingState === 'closed' || asked === 3) return;
      asked += 1;
      this.send({ resend: true });
      this.#resendTimer = setTimeout(check, ms);
    };
    this.#resendTimer = setTimeout(check, ms);
  }

  /**
   * Takes fresh ICE servers (renewed TURN credentials) for what this
   * connection gathers from now on: an ICE restart. Candidates already
   * gathered keep their own.
   * @param {RTCIceServer[]} iceServers
   */
  setIceServers(iceServers) {
    try {
      this.pc.setConfiguration({ ...this.pc.getConfiguration(), iceServers });
    } catch (err) {
      console.warn(`peer ${this.id}: could not take the renewed ICE servers`, err);
    }
  }

  /**
   * Caps what our camera and our screen send to this peer, bits/s
   * (bitrate.js): each a share of what all connections may take.
   * @param {{ camera: number, screen: number }} caps
   */
  setCaps(caps) {
    this.#caps = caps;
    this.#applyCaps();
  }

  #applyCaps(tries = 3) {
    // One at a time: a sender refuses parameters read before another
    // change of them went through.
    this.#capping = this.#capping.then(async () => {
      // Mid-negotiation Chromium refuses parameters read before it ends:
      // the caps wait for it to settle.
      if (!this.#caps || this.pc.signalingState !== 'stable') return;
      for (const [sender, bps] of [
        [this.#transceiver('video')?.sender, this.#caps.camera],
        [this.#screenTransceiver('video')?.sender, this.#caps.screen],
      ]) {
        try {
          await capSender(sender, bps);
        } catch (err) {
          // Just after a negotiation, Chromium may still refuse them
          // ("modified RTCP parameters"): a moment later it takes them.
          if (tries > 1) setTimeout(() => this.#applyCaps(tries - 1), 500);
          else console.warn(`peer ${this.id}: could not cap what is sent (${err.message})`);
          return;
        }
      }
    });
  }

  /** The camera's media section (its mid), once negotiated: the stats describe its video. */
  get cameraMid() { return this.#transceiver('video')?.mid ?? null; }

  /**
   * How loud the other side's microphone is just now (0–1, from the level
   * its browser puts in each audio packet, RFC 6464): 0 if nothing came in
   * the last half second, null if its packets carry no level.
   */
  get micLevel() {
    const latest = this.#transceiver('audio')?.receiver.getSynchronizationSources()[0];
    if (!latest) return 0;
    // The timestamp is on the wall clock's timeline (Date.now()'s).
    if (performance.timeOrigin + performance.now() - latest.timestamp > 500) return 0;
    return latest.audioLevel ?? null;
  }

  /** The chat data channel, once there is one (for stats and tests). */
  get chatChannel() { return this.#chat; }

  /**
   * Sends a chat message (its wire form) now if the channel is open, or
   * once it opens. False if it cannot go: the channel closed, or too many
   * wait for it.
   * @param {string} wire
   */
  sendChat(wire) {
    const channel = this.#chat;
    if (channel?.readyState === 'open') {
      try {
        channel.send(wire);
        return true;
      } catch (err) {
        // The channel's send buffer is full, or it closed just now.
        console.warn(`peer ${this.id}: a chat message could not be sent`, err);
        return false;
      }
    }
    if ((channel && channel.readyState !== 'connecting') || this.#chatQueue.length >= MAX_CHAT_QUEUE) return false;
    this.#chatQueue.push(wire);
    return true;
  }

  /**
   * Tells the other side that we are back with the server under the new
   * id `id`. Resolves to whether it answered (it keeps this connection)
   * within MOVED_ACK_MS.
   */
  sendMoved(id) {
    if (this.#chat?.readyState !== 'open') return Promise.resolve(false);
    return new Promise((resolve) => {
      const done = (answered) => {
        clearTimeout(timer);
        this.#movedAcks.delete(id);
        resolve(answered);
      };
      const timer = setTimeout(() => done(false), MOVED_ACK_MS);
      this.#movedAcks.set(id, done);
      if (!this.sendChat(encodeMoved(id))) done(false);
    });
  }

  /** Answers the other side's "moved": this connection is kept, under its new id. */
  ackMoved(id) {
    this.sendChat(encodeMovedAck(id));
  }

  /**
   * Sends `track`, a newly chosen microphone or camera, instead of the one
   * of its kind.
   * @param {MediaStreamTrack} track
   */
  async useLocalTrack(track) {
    // Not negotiated yet: #attachLocal will take the stream's tracks.
    const sender = this.#transceiver(track.kind)?.sender;
    if (!sender) return;
    try {
      await sender.replaceTrack(track);
    } catch (err) {
      console.warn(`peer ${this.id}: could not switch to the new ${track.kind} device`, err);
    }
  }

  /**
   * A new channel to send one file over (files.js), or null while the
   * connection has no data channels up: a channel opened then would need
   * a renegotiation.
   */
  openFileChannel() {
    if (this.#chat?.readyState !== 'open') return null;
    return this.pc.createDataChannel(FILE_LABEL, { protocol: FILE_PROTOCOL });
  }

  close() {
    clearTimeout(this.#restartTimer);
    clearTimeout(this.#resendTimer);
    this.pc.close();
    for (const t of [...this.remoteStream.getTracks(), ...this.screenStream.getTracks()]) t.stop();
  }

  async #offer() {
    try {
      this.#makingOffer = true;
      await this.pc.setLocalDescription();
      this.send({ description: this.pc.localDescription.toJSON() });
    } catch (err) {
      console.warn(`peer ${this.id}: creating an offer failed`, err);
    } finally {
      this.#makingOffer = false;
    }
  }

  async #onDescription(description) {
    const pc = this.pc;
    const readyForOffer = !this.#makingOffer && (pc.signalingState === 'stable' || this.#settingRemoteAnswer);
    const collision = description.type === 'offer' && !readyForOffer;
    if (collision) this.glares += 1;
    this.#ignoreOffer = !this.polite && collision;
    if (this.#ignoreOffer) return;
    try {
      this.#settingRemoteAnswer = description.type === 'answer';
      await pc.setRemoteDescription(description); // rolls back our offer if polite
    } finally {
      this.#settingRemoteAnswer = false;
    }
    if (description.type === 'offer') {
      // Adding tracks after the remote offer reuses its transceivers, so
      // our media goes out in this answer instead of a second round trip.
      this.#attachLocal();
      // Those we have no track for answer "sendrecv" all the same, as the
      // offerer's do (start()), so that a screen can be shared later;
      // with someone watching, or when we watch, one way (see the top).
      for (const t of pc.getTransceivers()) {
        if (t.currentDirection) continue;
        if (this.direction !== 'sendrecv') t.direction = this.direction;
        else if (t.direction === 'recvonly') t.direction = 'sendrecv';
      }
      if (this.#screen) await this.#sendScreenTracks();
      await pc.setLocalDescription();
      this.send({ description: pc.localDescription.toJSON() });
      if (collision) await this.#rewireSenders();
    }
  }

  /**
   * After a rollback Chromium (148) gives the senders new SSRCs but leaves
   * their encoders unfed: the tracks stay "live" and nothing is sent.
   * Handing each sender its own track again restarts the flow. (The frozen
   * receivers have no such cure; see the top of this file.)
   */
  async #rewireSenders() {
    for (const sender of this.pc.getSenders()) {
      if (!sender.track) continue;
      try {
        await sender.replaceTrack(sender.track);
      } catch (err) {
        console.warn(`peer ${this.id}: re-attaching a track failed`, err);
      }
    }
  }

  #takeChannel(channel) {
    if (channel.label === FILE_LABEL && channel.protocol === FILE_PROTOCOL) return this.#takeFileChannel(channel);
    if (channel.label !== CHAT_LABEL || channel.protocol !== CHAT_PROTOCOL || this.#chat) {
      console.warn(`peer ${this.id}: closed a data channel this app does not use: "${channel.label}" (${channel.protocol || 'no subprotocol'})`);
      channel.close();
      return;
    }
    this.#chat = channel;
    channel.addEventListener('open', () => {
      const queued = this.#chatQueue.splice(0);
      for (const wire of queued) this.sendChat(wire);
    });
    channel.addEventListener('message', ({ data }) => {
      let message;
      try {
        message = decodeChannelMessage(data);
      } catch (err) {
        if (!(err instanceof ChatError)) throw err;
        console.warn(`peer ${this.id} (${this.name}): ignored a chat message: ${err.message}`);
        return;
      }
      if (message.type === 'moved-ack') return this.#movedAcks.get(message.id)?.(true);
      this.dispatchEvent(new CustomEvent(message.type, { detail: message }));
    });
  }

  #takeFileChannel(channel) {
    if (this.#incomingFiles.size >= MAX_INCOMING_FILES) {
      console.warn(`peer ${this.id} (${this.name}): closed a file channel: ${MAX_INCOMING_FILES} of its files are already under way`);
      channel.close();
      return;
    }
    this.#incomingFiles.add(channel);
    channel.addEventListener('close', () => this.#incomingFiles.delete(channel));
    this.dispatchEvent(new CustomEvent('file', { detail: { channel } }));
  }

  #attachLocal() {
    if (this.#localAttached) return;
    this.#localAttached = true;
    const stream = this.localStream ?? new MediaStream();
    for (const track of stream.getTracks()) this.pc.addTrack(track, stream);
  }

  /** The first transceiver of `kind`: the microphone's, or the camera's. */
  #transceiver(kind) {
    return this.pc.getTransceivers().find((t) => t.receiver.track.kind === kind && t.currentDirection !== 'stopped');
  }

  /**
   * The second transceiver of `kind`: the screen's, or its sound's (null
   * before negotiation, or with an older app).
   */
  #screenTransceiver(kind = 'video') {
    return this.pc.getTransceivers().filter((t) => t.receiver.track.kind === kind && t.currentDirection !== 'stopped')[1] ?? null;
  }

  #onState() {
    const state = this.pc.connectionState;
    this.dispatchEvent(new CustomEvent('state', { detail: { state } }));
    clearTimeout(this.#restartTimer);
    if (state === 'failed') {
      this.renegotiate();
    } else if (state === 'disconnected') {
      // Often recovers by itself; restart ICE only if it does not.
      this.#restartTimer = setTimeout(() => {
        if (this.pc.connectionState === 'disconnected') this.renegotiate();
      }, 5000);
    }
  }
}
