// File transfer between the people in a call, peer to peer: each file goes
// to each peer over a data channel of its own (label "file", subprotocol
// "callisto.file.v1"), so a big file neither holds up the chat nor waits
// behind another file, and nothing goes through the server. Nobody
// receives a file they did not accept.
//
// On a file's channel (docs/protocol.md, "Files"), opened by the sender:
//   sender → receiver   { "type": "offer", "name": …, "size": …, "private": true? }
//   receiver → sender   { "type": "accept" } or { "type": "decline" }
//   sender → receiver   the bytes, in binary messages
//   sender → receiver   { "type": "end" }
//   the receiver closes the channel once it has kept all `size` bytes: the
//   sender's proof of delivery. Whoever closes it at any other point
//   stops the transfer; a receiver that cannot keep the file (no space)
//   says { "type": "failed" } first.

import { button, formatSize } from './ui.js';
import { Sink } from './received.js';

export const FILE_LABEL = 'file';
export const FILE_PROTOCOL = 'callisto.file.v1';
/**
 * The largest file sent or taken. A receiver keeps it on disk as it comes
 * (received.js), so this bounds only what an offer may claim; a receiver
 * also checks its own space when it accepts.
 */
export const MAX_FILE_BYTES = 64 * 1024 * 1024 * 1024;
// 16 KiB messages go between every pair of browsers (Chromium and Firefox
// take 256 KiB, older Safari less).
const CHUNK_BYTES = 16 * 1024;
const MAX_CHUNK_BYTES = 256 * 1024;
const READ_BYTES = 1024 * 1024;
// The sender stops reading the file while this much waits in the channel's
// buffer, so a fast disk does not fill memory ahead of a slow network.
const HIGH_WATER = 1024 * 1024;
const LOW_WATER = 256 * 1024;
const MAX_CONTROL_CHARS = 2048;
const MAX_NAME_CHARS = 255;
/** How long a receiver waits for a new channel's offer. */
const OFFER_TIMEOUT_MS = 10000;

export class FileError extends Error {}

/** A control message: a JSON object with a known `type`, or a FileError. */
export function decodeControl(data) {
  if (typeof data !== 'string') throw new FileError('binary data out of turn');
  if (data.length > MAX_CONTROL_CHARS) throw new FileError(`a control message of ${data.length} characters`);
  let msg;
  try { msg = JSON.parse(data); } catch { throw new FileError('not JSON'); }
  if (!['offer', 'accept', 'decline', 'end', 'failed'].includes(msg?.type)) throw new FileError(`an unknown type ${JSON.stringify(msg?.type ?? null)}`);
  return msg;
}

/** An offer's name, size and whether it went to this peer only, checked, or a FileError. */
export function checkOffer(msg) {
  if (msg.type !== 'offer') throw new FileError(`"${msg.type}" before an offer`);
  if (typeof msg.name !== 'string' || msg.name.length === 0 || [...msg.name].length > MAX_NAME_CHARS) throw new FileError('an offer without a usable name');
  if (!Number.isSafeInteger(msg.size) || msg.size < 0) throw new FileError('an offer without a usable size');
  if (msg.size > MAX_FILE_BYTES) throw new FileError(`an offer of ${formatSize(msg.size)}, over the ${formatSize(MAX_FILE_BYTES)} limit`);
  if (msg.private !== undefined && typeof msg.private !== 'boolean') throw new FileError('an offer with a "private" that is not true or false');
  return { name: safeName(msg.name), size: msg.size, private: msg.private === true };
}

/** A name that is only a file name: no folders, no control characters. */
export function safeName(name) {
  // eslint-disable-next-line no-control-regex
  const clean = name.replace(/[\u0000-\u001f\u007f/\\]/g, '_').trim().replace(/^\.+/, '_');
  return clean || 'file';
}

/** Resolves when the channel's buffer has drained below LOW_WATER, or it closed. */
function drained(channel) {
  return new Promise((resolve) => {
    channel.addEventListener('bufferedamountlow', resolve, { once: true });
    channel.addEventListener('close', resolve, { once: true });
  });
}

/**
 * Sends `file` over `channel`, a file channel just opened to one peer.
 * `report(state, detail)` hears what becomes of it: "waiting" (for the
 * peer to accept), "sending" (detail: the fraction sent), "delivering"
 * (all sent, not yet confirmed), then one of "sent", "declined",
 * "cancelled" or "failed" (detail: why).
 * @returns {{ cancel: () => void }}
 */
export function sendFile(channel, file, report, { private: only = false } = {}) {
  channel.binaryType = 'arraybuffer';
  channel.bufferedAmountLowThreshold = LOW_WATER;
  let phase = 'opening'; // → waiting → sending → delivering → done
  const finish = (state, detail) => {
    if (phase === 'done') return;
    phase = 'done';
    report(state, detail);
    channel.close();
  };
  // Sends, or ends the transfer if the channel has just closed under us.
  const send = (data) => {
    try {
      channel.send(data);
      return true;
    } catch {
      finish('failed', 'the connection closed');
      return false;
    }
  };

  channel.addEventListener('open', () => {
    const offer = { type: 'offer', name: file.name, size: file.size };
    if (only) offer.private = true;
    if (!send(JSON.stringify(offer))) return;
    phase = 'waiting';
    report('waiting');
  });
  channel.addEventListener('message', ({ data }) => {
    let msg;
    try {
      msg = decodeControl(data);
    } catch (err) {
      return finish('failed', `the receiver sent ${err.message}`);
    }
    if (msg.type === 'accept' && phase === 'waiting') {
      phase = 'sending';
      pump();
    } else if (msg.type === 'decline' && phase === 'waiting') {
      finish('declined');
    } else if (msg.type === 'failed' && (phase === 'sending' || phase === 'delivering')) {
      finish('failed', 'they could not keep it');
    } else {
      finish('failed', `the receiver sent "${msg.type}" out of turn`);
    }
  });
  channel.addEventListener('close', () => {
    if (phase === 'delivering') {
      phase = 'done';
      report('sent');
    } else if (phase === 'waiting') {
      // A decline comes as a message first: this is a peer that left, or a
      // connection that failed.
      finish('failed', 'the connection closed before they answered');
    } else {
      finish('failed', 'they cancelled, or the connection closed');
    }
  });

  async function pump() {
    let shown = -1;
    // The file is read a block at a time: each read is a round trip to
    // the browser's file store, too slow to make for every message.
    for (let offset = 0; offset < file.size; offset += READ_BYTES) {
      let block;
      try {
        block = new Uint8Array(await file.slice(offset, offset + READ_BYTES).arrayBuffer());
      } catch (err) {
        // Moved, deleted or changed on disk since it was picked.
        return finish('failed', `could not read the file (${err.message})`);
      }
      for (let at = 0; at < block.length; at += CHUNK_BYTES) {
        if (channel.bufferedAmount > HIGH_WATER) await drained(channel);
        if (phase !== 'sending' || !send(block.subarray(at, at + CHUNK_BYTES))) return;
      }
      const percent = Math.floor((100 * (offset + block.length)) / file.size);
      if (percent !== shown) report('sending', percent / 100);
      shown = percent;
    }
    if (!send(JSON.stringify({ type: 'end' }))) return;
    phase = 'delivering';
    report('delivering');
  }

  return { cancel: () => finish('cancelled') };
}

/**
 * A file a peer offers over a channel it opened. Dispatches "offer" once
 * a valid offer has come (detail: { name, size }), then "state" events
 * (detail: { state, detail }) with "receiving" (the fraction received),
 * "received" (detail: a Blob of the file), "declined", "cancelled" or
 * "failed" (why). Anything the peer sends out of turn ends the transfer
 * and the channel, with a console warning. The bytes are stored as they
 * come (received.js); `release()` lets a received file go.
 */
export class IncomingFile extends EventTarget {
  #channel;
  #phase = 'opening'; // → offered → receiving → (storing →) done
  #sink = null;
  #openStore;
  #received = 0;
  #timer;
  offer = null;

  /**
   * @param {RTCDataChannel} channel
   * @param {string} from who sent it, for warnings
   * @param {{ openStore?: Function }} options where the bytes go (received.js's Sink; for tests)
   */
  constructor(channel, from, { openStore } = {}) {
    super();
    this.#channel = channel;
    this.from = from;
    this.#openStore = openStore;
    channel.binaryType = 'arraybuffer';
    this.#timer = setTimeout(() => this.#fail(`no offer within ${OFFER_TIMEOUT_MS / 1000} s`), OFFER_TIMEOUT_MS);
    channel.addEventListener('message', ({ data }) => this.#onMessage(data));
    channel.addEventListener('close', () => {
      if (this.#phase === 'opening') this.#end('failed', 'closed before an offer');
      else if (this.#phase !== 'done') this.#end('cancelled', 'the sender stopped, or the connection closed');
    });
  }

  accept() {
    if (this.#phase !== 'offered') return;
    this.#phase = 'receiving';
    this.#sink = new Sink(this.offer.size, this.#openStore);
    this.#sink.onerror = (why) => {
      console.warn(`could not keep ${this.offer.name} from peer ${this.from}: ${why}`);
      // Said before the close, which alone would read as delivered after
      // the end; the sender is not told why (that would tell it our space).
      try {
        if (this.#channel.readyState === 'open') this.#channel.send(JSON.stringify({ type: 'failed' }));
      } catch { /* closing under us: the close says enough */ }
      this.#end('failed', why);
    };
    this.#channel.send(JSON.stringify({ type: 'accept' }));
    this.#state('receiving', 0);
  }

  /** Lets go of the file, received or not, from memory or disk. */
  release() {
    this.#sink?.discard();
    this.#sink = null;
  }

  decline() {
    if (this.#phase !== 'offered') return;
    if (this.#channel.readyState === 'open') this.#channel.send(JSON.stringify({ type: 'decline' }));
    this.#end('declined');
  }

  /** Stops receiving (or declines): the sender sees the channel close. */
  cancel() {
    if (this.#phase === 'offered') return this.decline();
    if (this.#phase !== 'done') this.#end('cancelled', 'you cancelled');
  }

  #onMessage(data) {
    try {
      if (this.#phase === 'receiving' && typeof data !== 'string') return this.#take(data);
      const msg = decodeControl(data);
      if (this.#phase === 'opening') {
        this.offer = checkOffer(msg);
        this.#phase = 'offered';
        clearTimeout(this.#timer);
        this.dispatchEvent(new CustomEvent('offer', { detail: this.offer }));
      } else if (this.#phase === 'receiving' && msg.type === 'end') {
        if (this.#received !== this.offer.size) throw new FileError(`the end after ${this.#received} of ${this.offer.size} bytes`);
        this.#store();
      } else {
        throw new FileError(`"${msg.type}" out of turn`);
      }
    } catch (err) {
      if (!(err instanceof FileError)) throw err;
      this.#fail(`it sent ${err.message}`);
    }
  }

  #take(chunk) {
    if (chunk.byteLength > MAX_CHUNK_BYTES) throw new FileError(`a message of ${chunk.byteLength} bytes`);
    this.#received += chunk.byteLength;
    if (this.#received > this.offer.size) throw new FileError(`more than the ${this.offer.size} bytes offered`);
    this.#sink.write(chunk);
    const before = Math.floor((100 * (this.#received - chunk.byteLength)) / this.offer.size);
    const now = Math.floor((100 * this.#received) / this.offer.size);
    if (now !== before) this.#state('receiving', now / 100);
  }

  #fail(why) {
    console.warn(`peer ${this.from}: stopped a file transfer: ${why}`);
    this.#end('failed', why);
  }

  /**
   * Waits for every byte to be stored, then closes the channel: the
   * sender's proof of delivery means the file is kept, not only that it
   * arrived.
   */
  async #store() {
    this.#phase = 'storing';
    let file;
    try {
      file = await this.#sink.finish();
    } catch {
      return; // the sink's onerror has ended the transfer
    }
    if (this.#phase === 'storing') this.#end('received', file);
    else this.release(); // cancelled, or the sender left, meanwhile
  }

  #end(state, detail) {
    if (this.#phase === 'done') return;
    this.#phase = 'done';
    clearTimeout(this.#timer);
    if (state !== 'received') this.release();
    this.#channel.close();
    // An offer nobody saw (a bad one) needs no word in the chat.
    if (this.offer) this.#state(state, detail);
  }

  #state(state, detail) {
    this.dispatchEvent(new CustomEvent('state', { detail: { state, detail } }));
  }
}

// ---- In the chat log ------------------------------------------------------

const SENDING = {
  waiting: () => 'waiting for them to accept',
  sending: (fraction) => `sending, ${Math.round(fraction * 100)} %`,
  delivering: () => 'sent, waiting for them to confirm',
  sent: () => 'delivered',
  declined: () => 'declined',
  cancelled: () => 'cancelled',
  failed: (why) => `failed: ${why}`,
};
const RECEIVING = {
  receiving: (fraction) => `receiving, ${Math.round(fraction * 100)} %`,
  received: () => 'received',
  declined: () => 'declined',
  cancelled: (why) => `stopped: ${why}`,
  failed: (why) => `failed: ${why}`,
};
const FINAL = new Set(['sent', 'declined', 'cancelled', 'failed', 'received']);

function progressBar(label) {
  const bar = document.createElement('progress');
  bar.max = 1;
  bar.value = 0;
  bar.hidden = true;
  bar.setAttribute('aria-label', label);
  return bar;
}

function title(entry, name, size) {
  entry.classList.add('file');
  const p = document.createElement('p');
  p.className = 'text file-name';
  p.textContent = `${name} (${formatSize(size)})`;
  entry.append(p);
}

/**
 * Sends `file` to each of `links` (peer.js), each over a channel of its
 * own, and shows in `entry` (a chat log entry) how it goes for each.
 * `private`: to the one link only, and its receiver is told so.
 */
export function offerFile(entry, file, links, { private: only = false } = {}) {
  title(entry, file.name, file.size);
  const list = document.createElement('ul');
  list.className = 'deliveries';
  const cancel = button('Cancel', `Cancel sending ${file.name}`);
  entry.append(list, cancel);
  const transfers = [];
  let going = 0;
  for (const link of links) {
    const line = document.createElement('li');
    line.dataset.peerId = link.id;
    const status = document.createElement('span');
    status.className = 'status';
    const bar = progressBar(`Sending ${file.name} to ${link.name}`);
    line.append(`${link.name}: `, status, ' ', bar);
    list.append(line);
    const channel = link.openFileChannel();
    if (!channel) {
      status.textContent = 'not sent: no connection';
      line.dataset.state = 'failed';
      continue;
    }
    going += 1;
    status.textContent = 'connecting';
    transfers.push(sendFile(channel, file, (state, detail) => {
      status.textContent = SENDING[state](detail);
      line.dataset.state = state;
      bar.hidden = state !== 'sending';
      if (state === 'sending') bar.value = detail;
      if (FINAL.has(state) && --going === 0) cancel.hidden = true;
    }, { private: only }));
  }
  cancel.hidden = going === 0;
  cancel.addEventListener('click', () => { for (const t of transfers) t.cancel(); });
}

/** Shows a file offered to the user in `entry`, with Accept and Decline. */
export function showIncoming(entry, incoming) {
  const { name, size } = incoming.offer;
  title(entry, name, size);
  const status = document.createElement('p');
  status.className = 'status';
  status.textContent = 'offered to you';
  const bar = progressBar(`Receiving ${name}`);
  const actions = document.createElement('div');
  actions.className = 'row actions';
  const accept = button('Accept', `Accept ${name}`);
  const decline = button('Decline', `Decline ${name}`);
  const cancel = button('Cancel', `Cancel receiving ${name}`);
  cancel.hidden = true;
  actions.append(accept, decline, cancel);
  entry.append(status, bar, actions);
  entry.dataset.state = 'offered';
  accept.addEventListener('click', () => incoming.accept());
  decline.addEventListener('click', () => incoming.decline());
  cancel.addEventListener('click', () => incoming.cancel());
  incoming.addEventListener('state', ({ detail: { state, detail } }) => {
    entry.dataset.state = state;
    status.textContent = RECEIVING[state](detail);
    bar.hidden = state !== 'receiving';
    if (state === 'receiving') bar.value = detail;
    accept.hidden = true;
    decline.hidden = true;
    cancel.hidden = FINAL.has(state);
    if (state !== 'received') return;
    const url = URL.createObjectURL(detail);
    const save = document.createElement('a');
    save.className = 'link';
    save.href = url;
    save.download = name;
    save.textContent = `Save ${name}`;
    actions.append(save); // not focused: the person may be typing
    entry.addEventListener('removed', () => {
      URL.revokeObjectURL(url);
      incoming.release();
    }, { once: true });
  });
}
