// Text chat between the people in a call: what a message is on the wire,
// and the chat panel. Messages travel peer to peer, over each link's data
// channel (peer.js), never through the server, so the server cannot read
// them and has nothing to keep. Who wrote a message is the name the server
// gave the link it came over, not anything the message says: a peer cannot
// pass itself off as someone else.
//
// On the wire (docs/protocol.md, "Chat"): one JSON object per data channel
// message, { "type": "chat", "text": "…" }, on the channel labelled "chat"
// with the subprotocol "callisto.chat.v1"; "private": true when it went to
// this one peer only.
//
// A private message goes over that one peer's channel and no other, so
// nobody else can see it. If that person leaves, the message box says so
// rather than sending to everyone.

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

// A web address in a message: http or https only (never javascript: or
// data:), up to white space or a character that cannot be in one.
const WEB_ADDRESS = /\bhttps?:\/\/[^\s<>"]+/gi;

/**
 * A message's text in parts, in order: `{ text }`, or `{ text, url }` for
 * a web address to show as a link. The parts' texts put together are the
 * message. Punctuation that ends a sentence after an address is not part
 * of it, nor is a closing bracket it did not open.
 */
export function linkify(text) {
  const parts = [];
  let at = 0;
  for (const match of text.matchAll(WEB_ADDRESS)) {
    let candidate = match[0];
    for (;;) {
      const last = candidate.at(-1);
      const unopened = last === ')' && candidate.split('(').length <= candidate.split(')').length - 1;
      if (!'.,;:!?\''.includes(last) && !unopened) break;
      candidate = candidate.slice(0, -1);
    }
    let url;
    try { url = new URL(candidate); } catch { continue; }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') continue;
    if (match.index > at) parts.push({ text: text.slice(at, match.index) });
    parts.push({ text: candidate, url: url.href });
    at = match.index + candidate.length;
  }
  if (at < text.length) parts.push({ text: text.slice(at) });
  return parts;
}

/**
 * The wire form of a message (`private`: to one peer only), or a ChatError
 * saying what is wrong with it.
 */
export function encodeChat(text, { private: only = false } = {}) {
  if (typeof text !== 'string' || text.trim().length === 0) throw new ChatError('the message is empty');
  if ([...text].length > MAX_CHAT_CHARS) throw new ChatError(`the message is longer than ${MAX_CHAT_CHARS} characters`);
  return JSON.stringify(only ? { type: 'chat', text, private: true } : { type: 'chat', text });
}

// Besides messages, the chat channel carries the link's own word that the
// peer at its other end came back to the server under a new id (after the
// server restarted, or its place there was lost): { "type": "moved",
// "id": NEW }, answered with { "type": "moved-ack", "id": NEW }. It comes
// over the channel, end to end (DTLS), so it cannot come from anyone else.
const PEER_ID = /^[A-Za-z0-9_-]{1,64}$/;

export function encodeMoved(id) { return JSON.stringify({ type: 'moved', id }); }
export function encodeMovedAck(id) { return JSON.stringify({ type: 'moved-ack', id }); }

/**
 * Anything received on the chat channel: { type: 'chat', text, private },
 * or { type: 'moved' | 'moved-ack', id }. Throws a ChatError naming what
 * is wrong with anything else.
 */
export function decodeChannelMessage(data) {
  const msg = parseChannelText(data);
  if (msg?.type === 'moved' || msg?.type === 'moved-ack') {
    if (data.length > 200) throw new ChatError(`a "${msg.type}" of ${data.length} characters`);
    if (typeof msg.id !== 'string' || !PEER_ID.test(msg.id)) throw new ChatError(`"${msg.type}" without a peer id`);
    return { type: msg.type, id: msg.id };
  }
  return { type: 'chat', ...checkChat(msg) };
}

/**
 * A received message: { text, private }. Throws a ChatError naming what is
 * wrong with anything else: the other side may be another version, or not
 * this app.
 */
export function decodeChat(data) {
  return checkChat(parseChannelText(data));
}

/** The JSON value of a message on the chat channel, or a ChatError. */
function parseChannelText(data) {
  if (typeof data !== 'string') throw new ChatError('a binary message');
  if (data.length > MAX_CHAT_BYTES) throw new ChatError(`a message of ${data.length} characters`);
  try { return JSON.parse(data); } catch { throw new ChatError('not JSON'); }
}

/** A parsed chat message's { text, private }, or a ChatError. */
function checkChat(msg) {
  if (msg?.type !== 'chat') throw new ChatError(`an unknown type ${JSON.stringify(msg?.type ?? null)}`);
  if (typeof msg.text !== 'string' || msg.text.trim().length === 0) throw new ChatError('no text');
  if ([...msg.text].length > MAX_CHAT_CHARS) throw new ChatError(`a text longer than ${MAX_CHAT_CHARS} characters`);
  if (msg.private !== undefined && typeof msg.private !== 'boolean') throw new ChatError('a "private" that is not true or false');
  return { text: msg.text, private: msg.private === true };
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
   * @param {(text: string, to: string|null) => boolean|void} onSend called with each message the user sends, and to whom (a peer's id, null for everyone); false if it did not go
   * @param {(files: File[], to: string|null) => void} onFiles called with the files the user picks to send, and to whom
   */
  constructor(onSend, onFiles) {
    this.panel = $('chat');
    this.log = $('chat-log');
    this.input = $('chat-input');
    this.to = $('chat-to');
    // Someone who left stays in the list only while chosen.
    this.to.addEventListener('change', () => {
      for (const option of [...this.to.options]) if (option.dataset.name && !option.selected) option.remove();
    });
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
      if (files.length) onFiles(files, this.recipient);
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
      // Kept in the box if it did not go (whom it was for has left).
      if (onSend(text, this.recipient) !== false) this.input.value = '';
    });
  }

  /** Someone in "To" goes by a new id (back with the server under it); still chosen if they were. */
  renamePerson(old, id) {
    for (const option of this.to.options) if (option.value === old) option.value = id;
  }

  /** Who the next message or file goes to: a peer's id, or null for everyone. */
  get recipient() { return this.to.value || null; }

  /**
   * The people one can write to privately, [{ id, name }]. Someone chosen
   * who has left stays chosen, marked as gone (sending then says so), so
   * a private message never goes to everyone by mistake.
   */
  setPeople(people) {
    const chosen = this.to.value;
    const options = [new Option('Everyone', '')];
    // Two people of the same name are told apart by the order they came in.
    const seen = new Map();
    const twice = new Set(people.map((p) => p.name).filter((n, i, all) => all.indexOf(n) !== i));
    for (const { id, name } of people) {
      const nth = (seen.get(name) ?? 0) + 1;
      seen.set(name, nth);
      options.push(new Option(twice.has(name) ? `${name} (${nth})` : name, id, false, id === chosen));
    }
    if (chosen && !people.some((p) => p.id === chosen)) {
      const gone = [...this.to.options].find((o) => o.value === chosen);
      const label = gone.dataset.name ?? gone.textContent;
      const option = new Option(`${label} (left the call)`, chosen, false, true);
      option.dataset.name = label;
      options.push(option);
    }
    this.to.replaceChildren(...options);
    this.to.value = chosen && options.some((o) => o.value === chosen) ? chosen : '';
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

  /**
   * Adds a message to the log; `mine` for the user's own, `to` the name
   * of whom one of them went to privately, `privately` for one that came
   * to the user only.
   */
  add(name, text, { mine = false, to = null, privately = false } = {}) {
    const body = document.createElement('p');
    body.className = 'text';
    // Text, never markup: web addresses become links, the rest text nodes.
    for (const part of linkify(text)) {
      if (!part.url) {
        body.append(part.text);
        continue;
      }
      const link = document.createElement('a');
      link.href = part.url;
      link.textContent = part.text;
      link.target = '_blank';
      // The page it opens gets no hold on this one, nor where it came from.
      link.rel = 'noopener noreferrer';
      body.append(link);
    }
    this.entry(name, { mine, to, privately, summary: text }).append(body);
  }

  /**
   * Adds an entry from `name` to the log, with its author and time (and
   * `to` or `privately`, as for add), and returns it for its content. One
   * from someone else counts as unread while the panel is closed, and its
   * `summary` is announced.
   */
  entry(name, { mine = false, to = null, privately = false, summary = 'a new message' } = {}) {
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
    head.append(who, ' ');
    const only = to ? `privately to ${to}` : privately ? 'privately to you' : null;
    if (only) {
      item.classList.add('private');
      const tag = document.createElement('span');
      tag.className = 'private-tag';
      tag.textContent = only;
      head.append(tag, ' ');
    }
    head.append(when);
    item.append(head);
    this.#append(item);
    if (!mine && !this.open) {
      this.#unread += 1;
      this.#label();
      this.#announce(`${name}${privately ? ', privately' : ''}: ${clip(summary, ANNOUNCE_CHARS)}`);
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
