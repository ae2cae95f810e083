// Property tests of what the web app reads from other peers: chat messages
// and file transfer control messages (docs/protocol.md, "Chat" and
// "Files"). Whatever a peer sends, the decoders give a value that keeps to
// the documented limits or a typed error, and never throw anything else.
//
// More cases: FC_RUNS=100000 node --test tests/app/

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ChatError, MAX_CHAT_CHARS, decodeChannelMessage, decodeChat, encodeChat, encodeMoved, encodeMovedAck, linkify } from '../../crates/web/app/js/chat.js';
import { FileError, MAX_FILE_BYTES, checkOffer, decodeControl, safeName } from '../../crates/web/app/js/files.js';
import { formatSize } from '../../crates/web/app/js/ui.js';
import { runs } from './props.js';

/** Calls `f`; returns its value, or the error if it is a `Type`. Any other error fails. */
function valueOr(Type, f) {
  try {
    return f();
  } catch (err) {
    if (err instanceof Type) return err;
    throw err;
  }
}

// Strings of every kind: any UTF-16 (lone surrogates too), and JSON-ish.
const anyString = fc.oneof(fc.string({ unit: 'binary' }), fc.string({ unit: 'grapheme' }), fc.json());
const anyJson = fc.jsonValue().map((v) => JSON.stringify(v));
const chatish = fc.record({
  type: fc.oneof(fc.constant('chat'), fc.string()),
  text: fc.oneof(fc.string({ unit: 'binary', maxLength: 5000 }), fc.jsonValue()),
  private: fc.oneof(fc.boolean(), fc.jsonValue()),
}, { requiredKeys: [] }).map((v) => JSON.stringify(v));
const bytes = fc.uint8Array({ maxLength: 64 });

test('a chat message from a peer is a non-blank text within the limit, private or not, or a ChatError', () => {
  fc.assert(fc.property(fc.oneof(anyString, anyJson, chatish, bytes), (data) => {
    const msg = valueOr(ChatError, () => decodeChat(data));
    if (msg instanceof ChatError) return;
    assert.deepEqual(Object.keys(msg), ['text', 'private']);
    assert.equal(typeof msg.text, 'string');
    assert.ok(msg.text.trim().length > 0);
    assert.ok([...msg.text].length <= MAX_CHAT_CHARS);
    assert.equal(typeof msg.private, 'boolean');
    // Private only when the sender said so in so many words.
    assert.equal(msg.private, JSON.parse(data).private === true);
  }), { numRuns: runs });
  assert.throws(() => decodeChat('{"type":"chat","text":"hi","private":"yes"}'), ChatError);
});

test('every message the app can send decodes to itself; what it cannot send is refused before it goes', () => {
  fc.assert(fc.property(fc.string({ unit: 'grapheme', maxLength: MAX_CHAT_CHARS + 50 }), fc.boolean(), (text, only) => {
    const wire = valueOr(ChatError, () => encodeChat(text, { private: only }));
    const sendable = text.trim().length > 0 && [...text].length <= MAX_CHAT_CHARS;
    assert.equal(!(wire instanceof ChatError), sendable);
    if (sendable) assert.deepEqual(decodeChat(wire), { text, private: only });
  }), { numRuns: runs });
  // The edges, exactly; and a message to everyone looks as it did before private ones.
  assert.deepEqual(decodeChat(encodeChat('😀'.repeat(MAX_CHAT_CHARS))), { text: '😀'.repeat(MAX_CHAT_CHARS), private: false });
  assert.equal(encodeChat('hi'), '{"type":"chat","text":"hi"}');
  assert.throws(() => encodeChat('a'.repeat(MAX_CHAT_CHARS + 1)), ChatError);
  assert.throws(() => encodeChat(' \n\t'), ChatError);
});

const movedish = fc.record({
  type: fc.constantFrom('moved', 'moved-ack', 'chat', 'Moved'),
  id: fc.oneof(fc.stringMatching(/^[0-9a-f]{32}$/), fc.string({ unit: 'binary', maxLength: 80 }), fc.jsonValue()),
  text: fc.string({ maxLength: 10 }),
}, { requiredKeys: [] }).map((v) => JSON.stringify(v));

test('on the chat channel, a "moved" or its answer names a usable peer id; anything else is a chat message or a ChatError', () => {
  fc.assert(fc.property(fc.oneof(anyString, anyJson, chatish, movedish, bytes), (data) => {
    const msg = valueOr(ChatError, () => decodeChannelMessage(data));
    if (msg instanceof ChatError) return;
    if (msg.type === 'chat') {
      assert.deepEqual(msg, { type: 'chat', ...decodeChat(data) });
      return;
    }
    assert.ok(['moved', 'moved-ack'].includes(msg.type));
    assert.deepEqual(Object.keys(msg), ['type', 'id']);
    assert.match(msg.id, /^[A-Za-z0-9_-]{1,64}$/);
  }), { numRuns: runs });
  fc.assert(fc.property(fc.stringMatching(/^[A-Za-z0-9_-]{1,64}$/), (id) => {
    assert.deepEqual(decodeChannelMessage(encodeMoved(id)), { type: 'moved', id });
    assert.deepEqual(decodeChannelMessage(encodeMovedAck(id)), { type: 'moved-ack', id });
  }), { numRuns: runs });
  assert.throws(() => decodeChannelMessage('{"type":"moved","id":"../x"}'), ChatError);
});

const offerish = fc.record({
  type: fc.oneof(fc.constant('offer'), fc.constantFrom('accept', 'decline', 'end', 'failed'), fc.string()),
  name: fc.oneof(fc.string({ unit: 'binary', maxLength: 300 }), fc.constantFrom('../../etc/passwd', '..', '.', '\\\\server\\share', 'a\u0000b'), fc.jsonValue()),
  size: fc.oneof(fc.integer({ min: -10, max: MAX_FILE_BYTES + 10 }), fc.constantFrom(2 ** 53, -0, 0.5, NaN, Infinity), fc.jsonValue()),
  private: fc.oneof(fc.boolean(), fc.jsonValue()),
}, { requiredKeys: [] }).map((v) => JSON.stringify(v));

test('a control message on a file channel has a known type, and an offer a usable name and size, or a FileError', () => {
  fc.assert(fc.property(fc.oneof(anyString, anyJson, offerish, bytes), (data) => {
    const msg = valueOr(FileError, () => decodeControl(data));
    if (msg instanceof FileError) return;
    assert.ok(['offer', 'accept', 'decline', 'end', 'failed'].includes(msg.type));
    const offer = valueOr(FileError, () => checkOffer(msg));
    if (offer instanceof FileError) return;
    assert.equal(msg.type, 'offer');
    assert.ok(Number.isSafeInteger(offer.size) && offer.size >= 0 && offer.size <= MAX_FILE_BYTES);
    assert.equal(offer.name, safeName(offer.name), 'the name is already safe');
    assert.equal(offer.private, JSON.parse(data).private === true);
  }), { numRuns: runs });
});

test('a safe name is only a file name: no folders, no control characters, no leading dot, never empty', () => {
  // Names made of the characters that matter most, so their mixes come up.
  const tricky = fc.string({ unit: fc.constantFrom(' ', '.', '/', '\\', '\u0000', '\t', '\u00a0', 'a', 'é') });
  fc.assert(fc.property(fc.oneof(fc.string({ unit: 'binary' }), tricky), (name) => {
    const safe = safeName(name);
    assert.ok(safe.length > 0);
    // eslint-disable-next-line no-control-regex
    assert.doesNotMatch(safe, /[\u0000-\u001f\u007f/\\]/);
    assert.ok(!safe.startsWith('.'));
    assert.equal(safeName(safe), safe);
  }), { numRuns: runs });
});

test('a size reads as a number and a unit', () => {
  fc.assert(fc.property(fc.integer({ min: 0, max: MAX_FILE_BYTES * 4 }), (n) => {
    assert.match(formatSize(n), /^\d+(\.\d)? (B|KB|MB|GB)$/);
  }), { numRuns: runs });
  assert.equal(formatSize(1023), '1023 B');
  assert.equal(formatSize(1536 * 1024), '1.5 MB');
  assert.equal(formatSize(MAX_FILE_BYTES), '64 GB');
});

test('a message is cut into text and web links that put together are the message; a link is only ever http or https', () => {
  // Messages made of the pieces that matter most, so that their mixes come up.
  const piece = fc.oneof(
    fc.string({ unit: 'binary', maxLength: 8 }),
    fc.constantFrom('http://', 'https://', 'HTTPS://', 'javascript:', 'data:', 'example.test', '/a?b=1&c', '(', ')', '.', ',', ' ', '\n', '"', '<', 'www.', '//', ':'),
  );
  fc.assert(fc.property(fc.array(piece, { maxLength: 20 }).map((p) => p.join('')), (text) => {
    const parts = linkify(text);
    assert.equal(parts.map((p) => p.text).join(''), text);
    for (const part of parts) {
      assert.ok(part.text.length > 0, 'no empty part');
      if (!part.url) continue;
      assert.match(part.text, /^https?:\/\//i);
      assert.doesNotMatch(part.text, /\s/);
      assert.ok(['http:', 'https:'].includes(new URL(part.url).protocol), part.url);
      assert.ok(!'.,;:!?\''.includes(part.text.at(-1)), `ends with ${part.text.at(-1)}`);
    }
  }), { numRuns: runs });
  assert.deepEqual(linkify('see https://example.test/a?b=1.'), [
    { text: 'see ' }, { text: 'https://example.test/a?b=1', url: 'https://example.test/a?b=1' }, { text: '.' },
  ]);
  assert.deepEqual(linkify('javascript:alert(1)'), [{ text: 'javascript:alert(1)' }]);
  assert.deepEqual(linkify('(https://x.test/wiki/A_(b))').map((p) => p.text), ['(', 'https://x.test/wiki/A_(b)', ')']);
});
