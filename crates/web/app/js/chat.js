// Text chat between the people in a call: what a message is on the wire,
// and the chat panel. Messages travel peer to peer, over each link's data
// channel (peer.js), never through the server, so the server cannot read
// them and has nothing to keep. Who wrote a message is the name the server
// gave the link it came over, not anything the message says: a peer cannot
// pass itself off as someone else.
//
// On the wire (docs/protocol.md, "Chat"): one JSON object per data channel
// message, { "type": "chat", "text": "…" }, on the channel labelled "chat"
// with the subprotocol "callisto.chat.v1".

import { $ } from './ui.js';

export const CHAT_LABEL = 'chat';
export const CHAT_PROTOCOL = 'callisto.chat.v1';
/** The longest message, in characters (code points). */
export const MAX_CHAT_CHARS = 4000;
// Four UTF-8 bytes per code point at most, plus the JSON around it and its
// escapes: anything bigger cannot be a message we would send.
const MAX_CHAT_BYTES = 6 * MAX_CHAT_CHARS + 64;
/** Messages the panel shows at most; older ones go, so a flood cannot fill memory. */
export const MAX_CHAT_LOG = 500;
// While the panel is closed, what arrives is announced to screen readers
// at most this often; what comes in between is counted in the next one.
const ANNOUNCE_EVERY_MS = 2000;
// An announcement reads this many characters of a message at most.
const ANNOUNCE_CHARS = 200;

export class ChatError extends Error {}

/** The wire form of a message, or a ChatError saying what is wrong with it. */
export function encodeChat(text) {
  if (typeof text !== 'string' || text.trim().length === 0) throw new ChatError('the message is empty');
  if ([...text].length > MAX_CHAT_CHARS) throw new ChatError(`the message is longer than ${MAX_CHAT_CHARS} characters`);
  return JSON.stringify({ type: 'chat', text });
}

/**
 * A received message's text. Throws a ChatError naming what is wrong with
 * anything else: the other side may be another version, or not this app.
 */
export function decodeChat(data) {
  if (typeof data !== 'string') throw new ChatError('a binary message');
  if (data.length > MAX_CHAT_BYTES) throw new ChatError(`a message of ${data.length} characters`);
  let msg;
  try { msg = JSON.parse(data); } catch { throw new ChatError('not JSON'); }
  if (msg?.type !== 'chat') throw new ChatError(`an unknown type ${JSON.stringify(msg?.type ?? null)}`);
  if (typeof msg.text !== 'string' || msg.text.trim().length === 0) throw new ChatError('no text');
  if ([...msg.text].length > MAX_CHAT_CHARS) throw new ChatError(`a text longer than ${MAX_CHAT_CHARS} characters`);
  return msg.text;
}

/**
 * The chat panel: a log of messages, a form to write one, and the button
 * that opens and closes it and counts what came in while it was closed.
 */
export class ChatPanel {
  #unread = 0;
  #toAnnounce = [];
  #announceTimer = null;

  /**
   * @param {(text: string) => void} onSend called with each message the user sends
   * @param {(files: File[]) => void} onFiles called with the files the user picks to send
   */
  constructor(onSend, onFiles) {
    this.panel = $('chat');
    this.log = $('chat-log');
    this.input = $('chat-input');
    this.button = $('chat-btn');
    this.announcer = $('chat-announce');
    this.input.maxLength = MAX_CHAT_CHARS;
    this.button.addEventListener('click', () => this.toggle());
    this.panel.addEventListener('keydown', (ev) => {
      if (ev.key === 'Escape') {
        this.toggle(false);
        this.button.focus();
      }
    });
    const picker = $('file-input');
    $('file-btn').addEventListener('click', () => picker.click());
    picker.addEventListener('change', () => {
      const files = [...picker.files];
      picker.value = '';
      if (files.length) onFiles(files);
    });
    $('chat-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const text = this.input.value;
      if (text.trim().length === 0) return;
      try {
        encodeChat(text); // says what is wrong before anything is shown
      } catch (err) {
        this.note(`Not sent: ${err.message}.`);
        return;
      }
      this.input.value = '';
      onSend(text);
    });
  }

  get open() { return !this.panel.hidden; }

  /** Opens (true), closes (false) or toggles the panel. */
  toggle(open = !this.open) {
    this.panel.hidden = !open;
    this.button.setAttribute('aria-expanded', String(open));
    if (open) {
      this.#unread = 0;
      // The log speaks for itself now (its own live region).
      this.#toAnnounce = [];
      this.announcer.replaceChildren();
      this.input.focus();
      this.log.lastElementChild?.scrollIntoView({ block: 'end' });
    }
    this.#label();
  }

  /** Adds a message to the log; `mine` for the user's own. */
  add(name, text, { mine = false } = {}) {
    const body = document.createElement('p');
    body.className = 'text';
    body.textContent = text; // text, never markup
    this.entry(name, { mine, summary: text }).append(body);
  }

  /**
   * Adds an entry from `name` to the log, with its author and time, and
   * returns it for its content. One from someone else counts as unread
   * while the panel is closed, and its `summary` is announced.
   */
  entry(name, { mine = false, summary = 'a new message' } = {}) {
    const item = document.createElement('li');
    item.className = mine ? 'message mine' : 'message';
    const head = document.createElement('p');
    head.className = 'meta';
    const who = document.createElement('span');
    who.className = 'author';
    who.textContent = mine ? `${name} (you)` : name;
    const when = document.createElement('time');
    const now = new Date();
    when.dateTime = now.toISOString();
    when.textContent = now.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    head.append(who, ' ', when);
    item.append(head);
    this.#append(item);
    if (!mine && !this.open) {
      this.#unread += 1;
      this.#label();
      this.#announce(`${name}: ${clip(summary, ANNOUNCE_CHARS)}`);
    }
    return item;
  }

  /** Adds a line from the app itself, such as why a message did not go. */
  note(text) {
    const item = document.createElement('li');
    item.className = 'note';
    item.textContent = text;
    this.#append(item);
  }

  #append(item) {
    this.log.append(item);
    while (this.log.childElementCount > MAX_CHAT_LOG) {
      const gone = this.log.firstElementChild;
      gone.remove();
      gone.dispatchEvent(new Event('removed')); // a file entry lets its data go
    }
    if (this.open) item.scrollIntoView({ block: 'end' });
  }

  /**
   * Tells screen readers of a message while the panel is closed: the
   * first at once, then at most one announcement every ANNOUNCE_EVERY_MS,
   * which counts the messages that came meanwhile (a flood is not read
   * out message by message).
   */
  #announce(text) {
    this.#toAnnounce.push(text);
    if (!this.#announceTimer) this.#flushAnnouncements();
  }

  #flushAnnouncements() {
    const texts = this.#toAnnounce.splice(0);
    if (!texts.length) {
      this.#announceTimer = null;
      return;
    }
    // A new element each time: a screen reader reads it even when its
    // words are the same as the last one's.
    const line = document.createElement('p');
    line.textContent = texts.length === 1 ? `Chat, ${texts[0]}` : `Chat, ${texts.length} new messages`;
    this.announcer.replaceChildren(line);
    this.#announceTimer = setTimeout(() => this.#flushAnnouncements(), ANNOUNCE_EVERY_MS);
  }

  #label() {
    this.button.textContent = this.#unread ? `Chat (${this.#unread} new)` : 'Chat';
  }
}

/** `text` cut to `max` characters (code points), with an ellipsis if cut. */
function clip(text, max) {
  const chars = [...text];
  return chars.length <= max ? text : `${chars.slice(0, max - 1).join('')}…`;
}
