// One RTCPeerConnection to one remote peer, negotiated with the "perfect
// negotiation" pattern: either side may renegotiate at any time, and when
// offers cross (glare) the polite side rolls back and the impolite side
// ignores the other's offer. Roles come from comparing peer ids, so both
// sides agree without talking about it.
//
// Signals on the wire: { description } (an SDP offer or answer) and
// { candidate } (a trickled ICE candidate); { state } carries mute state.

export class PeerLink extends EventTarget {
  #makingOffer = false;
  #ignoreOffer = false;
  #settingRemoteAnswer = false;
  #localAttached = false;
  #restartTimer = null;
  glares = 0;

  /**
   * @param {object} o
   * @param {string} o.id remote peer id
   * @param {string} o.name remote display name
   * @param {boolean} o.polite whether this side yields in glare
   * @param {RTCIceServer[]} o.iceServers
   * @param {MediaStream|null} o.localStream
   * @param {(data: object) => void} o.send sends a signal to the remote peer
   */
  constructor({ id, name, polite, iceServers, localStream, send }) {
    super();
    this.id = id;
    this.name = name;
    this.polite = polite;
    this.localStream = localStream;
    this.send = send;
    this.remoteStream = new MediaStream();
    this.pc = new RTCPeerConnection({ iceServers });

    this.pc.addEventListener('negotiationneeded', () => this.#offer());
    this.pc.addEventListener('icecandidate', ({ candidate }) => {
      if (candidate) this.send({ candidate: candidate.toJSON() });
    });
    this.pc.addEventListener('track', ({ track }) => {
      this.remoteStream.addTrack(track);
      track.addEventListener('ended', () => this.remoteStream.removeTrack(track));
      this.dispatchEvent(new CustomEvent('track', { detail: { track } }));
    });
    this.pc.addEventListener('connectionstatechange', () => this.#onState());
  }

  /**
   * Starts the call from this side: sends our media (or asks to receive
   * only) and so triggers the first offer. The other side waits for it.
   */
  start() {
    this.#attachLocal();
    const kinds = new Set(this.pc.getTransceivers().map((t) => t.receiver.track.kind));
    for (const kind of ['audio', 'video']) {
      if (!kinds.has(kind)) this.pc.addTransceiver(kind, { direction: 'recvonly' });
    }
  }

  async handleSignal(data) {
    if (data.description) {
      await this.#onDescription(data.description);
    } else if (data.candidate) {
      try {
        await this.pc.addIceCandidate(data.candidate);
      } catch (err) {
        // Candidates for an offer we ignored in glare are expected to fail.
        if (!this.#ignoreOffer) console.warn(`peer ${this.id}: bad ICE candidate`, err);
      }
    }
  }

  /** Forces a fresh offer (ICE restart); used after a failure and by tests. */
  renegotiate() {
    this.pc.restartIce();
  }

  close() {
    clearTimeout(this.#restartTimer);
    this.pc.close();
    for (const t of this.remoteStream.getTracks()) t.stop();
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
      await pc.setLocalDescription();
      this.send({ description: pc.localDescription.toJSON() });
    }
  }

  #attachLocal() {
    if (this.#localAttached || !this.localStream) return;
    this.#localAttached = true;
    for (const track of this.localStream.getTracks()) this.pc.addTrack(track, this.localStream);
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
