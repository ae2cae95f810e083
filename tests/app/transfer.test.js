// Property tests of file transfer's two ends (files.js) over fake data
// channels: a sender and a receiver wired together deliver every file
// whole, and a receiver fed anything at all by a peer never takes more,
// less or other than what was offered and accepted; where the receiver
// keeps it (received.js), slow or failing, changes none of that.
//
// More cases: FC_RUNS=100000 node --test tests/app/

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { IncomingFile, MAX_FILE_BYTES, sendFile } from '../../crates/web/app/js/files.js';
import { MEMORY_LIMIT, Sink } from '../../crates/web/app/js/received.js';
import { runs } from './props.js';

/**
 * Enough of an RTCDataChannel: it records what is sent, and a closed one
 * refuses to send. `peer` (another FakeChannel) gets what this one sends,
 * and hears it close, a task later, as over a real connection.
 */
class FakeChannel extends EventTarget {
  readyState = 'connecting';
  binaryType = 'blob';
  bufferedAmount = 0;
  bufferedAmountLowThreshold = 0;
  sent = [];
  peer = null;

  open() {
    this.readyState = 'open';
    this.dispatchEvent(new Event('open'));
  }

  send(data) {
    if (this.readyState !== 'open') throw new DOMException('not open', 'InvalidStateError');
    const copy = typeof data === 'string' ? data : new Uint8Array(data).slice().buffer;
    this.sent.push(copy);
    if (this.peer) setTimeout(() => this.peer.deliver(copy));
  }

  close() {
    if (this.readyState === 'closed') return;
    this.readyState = 'closed';
    setTimeout(() => this.dispatchEvent(new Event('close')));
    if (this.peer) setTimeout(() => this.peer.close());
  }

  deliver(data) {
    if (this.readyState !== 'open') return;
    this.dispatchEvent(new MessageEvent('message', { data }));
  }
}

/** Resolves once every timer queued so far, and those they queue, has run. */
async function settle(rounds = 8) {
  for (let i = 0; i < rounds; i++) await new Promise((r) => setTimeout(r));
}

/** Everything `incoming` reports, in order. */
function record(incoming) {
  const events = [];
  incoming.addEventListener('offer', (e) => events.push({ kind: 'offer', ...e.detail }));
  incoming.addEventListener('state', (e) => events.push({ kind: e.detail.state, detail: e.detail.detail }));
  return events;
}

const fileBytes = fc.uint8Array({ maxLength: 200_000 });

test('a file sent to a receiver that accepts it arrives whole, and the sender hears it was delivered', async () => {
  await fc.assert(fc.asyncProperty(fileBytes, fc.string({ minLength: 1, maxLength: 40 }), async (bytes, name) => {
    const out = new FakeChannel();
    const into = new FakeChannel();
    out.peer = into;
    into.peer = out;
    into.readyState = 'open'; // a channel the peer opened arrives open
    const incoming = new IncomingFile(into, 'test');
    const events = record(incoming);
    incoming.addEventListener('offer', () => incoming.accept());
    const reports = [];
    sendFile(out, new File([bytes], name), (state) => reports.push(state));
    out.open();
    await settle(Math.ceil(bytes.length / 16384) + 12);
    const received = events.find((e) => e.kind === 'received');
    assert.ok(received, `received (events: ${events.map((e) => e.kind)}; sender: ${reports})`);
    assert.deepEqual(new Uint8Array(await received.detail.arrayBuffer()), bytes);
    assert.equal(reports.at(-1), 'sent');
    assert.ok(reports.indexOf('waiting') < reports.indexOf('delivering'));
    assert.equal(into.readyState, 'closed');
  }), { numRuns: Math.min(runs, 200) });
});

test('a declined file sends no byte; a cancelled one stops', async () => {
  for (const answer of ['decline', 'cancel']) {
    const out = new FakeChannel();
    const into = new FakeChannel();
    out.peer = into;
    into.peer = out;
    into.readyState = 'open';
    const incoming = new IncomingFile(into, 'test');
    const events = record(incoming);
    incoming.addEventListener('offer', () => incoming[answer]());
    const reports = [];
    sendFile(out, new File([new Uint8Array(50_000)], 'f'), (state) => reports.push(state));
    out.open();
    await settle(20);
    assert.ok(!out.sent.some((m) => typeof m !== 'string'), `${answer}: no data sent`);
    assert.equal(reports.at(-1), 'declined', answer);
    assert.equal(events.at(-1).kind, 'declined', answer);
  }
});

// What a peer may put on a file channel: control messages of every kind,
// well-formed or not, and binary messages of any size.
const action = fc.oneof(
  { weight: 3, arbitrary: fc.integer({ min: 0, max: 40 }).map((size) => ({ send: JSON.stringify({ type: 'offer', name: 'f', size }) })) },
  { weight: 1, arbitrary: fc.constantFrom('accept', 'decline', 'end', 'failed').map((type) => ({ send: JSON.stringify({ type }) })) },
  { weight: 1, arbitrary: fc.oneof(fc.string(), fc.jsonValue().map((v) => JSON.stringify(v))).map((s) => ({ send: s })) },
  { weight: 4, arbitrary: fc.uint8Array({ maxLength: 16 }).map((b) => ({ send: b.buffer })) },
  { weight: 2, arbitrary: fc.constant({ send: JSON.stringify({ type: 'end' }) }) },
  { weight: 3, arbitrary: fc.constant({ user: 'accept' }) },
  { weight: 1, arbitrary: fc.constantFrom({ user: 'decline' }, { user: 'cancel' }) },
  { weight: 1, arbitrary: fc.constant({ close: true }) },
);

test('a receiver fed anything keeps to the protocol: only an accepted offer\'s exact bytes, ended, make a file', async () => {
  await fc.assert(fc.asyncProperty(fc.array(action, { maxLength: 30 }), async (actions) => {
    const channel = new FakeChannel();
    channel.readyState = 'open';
    const incoming = new IncomingFile(channel, 'test');
    const events = record(incoming);
    // The model: what a correct receiver must make of the same actions.
    let phase = 'opening';
    let size = 0;
    let got = [];
    let expected = null; // 'received' with bytes, or another ending
    for (const a of actions) {
      if (channel.readyState !== 'open') break;
      if (a.close) {
        channel.close();
        await settle(2);
        // A file being stored in memory is kept within microtasks, before
        // the close reaches the receiver.
        if (phase === 'storing') expected = 'received';
        else if (phase !== 'done') expected = phase === 'opening' ? null : 'cancelled';
        phase = 'done';
        break;
      }
      if (a.user) {
        incoming[a.user]();
        if (phase === 'offered' && a.user === 'accept') phase = 'receiving';
        else if (phase === 'offered') { expected = 'declined'; phase = 'done'; }
        else if ((phase === 'receiving' || phase === 'storing') && a.user === 'cancel') { expected = 'cancelled'; phase = 'done'; }
        continue;
      }
      channel.deliver(a.send);
      const text = typeof a.send === 'string' ? a.send : null;
      let msg = null;
      try { msg = text === null ? null : JSON.parse(text); } catch { msg = undefined; }
      if (phase === 'opening') {
        const valid = msg?.type === 'offer' && Number.isSafeInteger(msg.size) && msg.size >= 0 && msg.size <= MAX_FILE_BYTES && typeof msg.name === 'string' && msg.name.length > 0;
        if (valid) { phase = 'offered'; size = msg.size; } else { phase = 'done'; expected = null; }
      } else if (phase === 'offered') {
        phase = 'done';
        expected = 'failed';
      } else if (phase === 'receiving') {
        if (text === null) {
          got.push(...new Uint8Array(a.send));
          if (got.length > size) { phase = 'done'; expected = 'failed'; }
        } else if (msg?.type === 'end' && text.length <= 2048) {
          // Ended whole, it is kept (a few microtasks later) before the
          // channel closes; anything the peer says meanwhile is out of turn.
          phase = got.length === size ? 'storing' : 'done';
          if (phase === 'done') expected = 'failed';
        } else {
          phase = 'done';
          expected = 'failed';
        }
      } else if (phase === 'storing') {
        phase = 'done';
        expected = 'failed';
      }
    }
    await settle(2);
    if (phase === 'storing') { phase = 'done'; expected = 'received'; }
    incoming.cancel(); // ends what is left, and its timer
    await settle(2);
    const endings = events.filter((e) => e.kind !== 'offer' && e.kind !== 'receiving');
    assert.ok(endings.length <= 1, `one ending at most: ${endings.map((e) => e.kind)}`);
    if (phase === 'done' && expected === null) {
      assert.deepEqual(events, [], 'nothing to show for a channel without a valid offer');
    } else if (phase === 'done') {
      assert.equal(endings[0]?.kind, expected, `actions: ${JSON.stringify(actions)}`);
      if (expected === 'received') {
        assert.deepEqual([...new Uint8Array(await endings[0].detail.arrayBuffer())], got);
      }
    }
    assert.equal(channel.readyState, 'closed', 'the channel is closed at the end, whatever happened');
    // The receiver said at most one of accept or decline, and nothing else.
    const said = channel.sent.map((m) => JSON.parse(m).type);
    assert.ok(said.length <= 1 && said.every((t) => t === 'accept' || t === 'decline'), `said ${said}`);
  }), { numRuns: Math.min(runs, 2000) });
});

/**
 * Where a receiver keeps a file (received.js's store), in memory, with
 * each step taking `delays()` turns of the event loop; it fails where
 * `failAt` says: 'open', a write's number, or 'finish'.
 */
const FINAL = new Set(['sent', 'declined', 'cancelled', 'failed']);

class SlowStore {
  written = [];
  finished = false;
  discarded = false;

  constructor(delays, failAt) {
    this.delays = delays;
    this.failAt = failAt;
  }

  async wait() {
    for (let i = this.delays(); i > 0; i--) await new Promise((r) => setTimeout(r));
  }

  open = async () => {
    await this.wait();
    if (this.failAt === 'open') throw new Error('no room');
    return this;
  };

  async write(bytes) {
    await this.wait();
    if (this.failAt === this.written.length) throw new Error('disk full');
    this.written.push(new Uint8Array(bytes).slice());
  }

  async finish() {
    await this.wait();
    if (this.failAt === 'finish') throw new Error('could not close');
    this.finished = true;
    return new Blob(this.written);
  }

  async discard() { this.discarded = true; }
}

/** Runs event-loop turns until `done()` or `rounds` have passed. */
async function until(done, rounds) {
  for (let i = 0; i < rounds && !done(); i++) await new Promise((r) => setTimeout(r));
}

/** A sender and a receiver keeping into `store`, wired together; the receiver accepts. */
function transfer(bytes, store) {
  const out = new FakeChannel();
  const into = new FakeChannel();
  out.peer = into;
  into.peer = out;
  into.readyState = 'open';
  const incoming = new IncomingFile(into, 'test', { openStore: store.open });
  const events = record(incoming);
  incoming.addEventListener('offer', () => incoming.accept());
  // What the store held when the receiver closed the channel: the
  // sender's proof of delivery.
  let keptAtClose = null;
  const close = into.close.bind(into);
  into.close = () => {
    keptAtClose ??= store.finished;
    close();
  };
  const reports = [];
  sendFile(out, new File([bytes], 'f'), (state, detail) => reports.push({ state, detail }));
  out.open();
  return { events, reports, closedKept: () => keptAtClose, into };
}

const bigFile = fc.integer({ min: 0, max: 3.5 * 1024 * 1024 }).map((n) => {
  const bytes = new Uint8Array(n);
  for (let i = 0; i < n; i++) bytes[i] = (i * 7 + (i >> 12)) & 0xff;
  return bytes;
});

test('a file kept by a slow store arrives whole and in order, and is delivered only once it is kept', async () => {
  await fc.assert(fc.asyncProperty(bigFile, fc.infiniteStream(fc.nat(3)), async (bytes, delays) => {
    const store = new SlowStore(() => delays.next().value, null);
    const { events, reports, closedKept } = transfer(bytes, store);
    await until(() => reports.at(-1)?.state === 'sent', 20 * Math.ceil(bytes.length / 16384) + 200);
    const received = events.find((e) => e.kind === 'received');
    assert.ok(received, `received (events: ${events.map((e) => e.kind)})`);
    assert.deepEqual(new Uint8Array(await received.detail.arrayBuffer()), bytes);
    assert.equal(reports.at(-1).state, 'sent');
    assert.equal(closedKept(), true, 'the channel closed only after the file was kept');
    assert.ok(store.written.every((w, i) => i === store.written.length - 1 || w.length >= 1024 * 1024), 'written in batches of 1 MiB or more');
    assert.equal(store.discarded, false);
  }), { numRuns: Math.min(runs, 25) });
});

test('a store that fails ends the transfer with its reason at both ends, and lets the bytes go', async () => {
  await fc.assert(fc.asyncProperty(
    bigFile.filter((b) => b.length > 0),
    fc.oneof(fc.constant('open'), fc.constant('finish'), fc.nat(3)),
    fc.infiniteStream(fc.nat(2)),
    async (bytes, failAt, delays) => {
      const store = new SlowStore(() => delays.next().value, failAt);
      const { events, reports, into } = transfer(bytes, store);
      await until(() => FINAL.has(reports.at(-1)?.state) && into.readyState === 'closed', 20 * Math.ceil(bytes.length / 16384) + 200);
      const batches = Math.ceil(bytes.length / (1024 * 1024));
      if (typeof failAt === 'number' && failAt >= batches) {
        // It never came to that write.
        assert.equal(reports.at(-1).state, 'sent');
        return;
      }
      const ending = events.filter((e) => e.kind !== 'offer' && e.kind !== 'receiving');
      assert.deepEqual(ending.map((e) => e.kind), ['failed']);
      assert.match(ending[0].detail, /could not store it \((no room|disk full|could not close)\)/);
      assert.deepEqual(reports.at(-1), { state: 'failed', detail: 'they could not keep it' }, 'the sender hears it failed, not why');
      if (failAt !== 'open') {
        await until(() => store.discarded, 50);
        assert.ok(store.discarded, 'what was written is let go');
      }
    },
  ), { numRuns: Math.min(runs, 25) });
});

test('a disk that cannot keep up ends the transfer instead of filling memory', async () => {
  const never = { open: async () => ({ write: () => new Promise(() => {}), finish: async () => new Blob(), discard: async () => {} }) };
  const sink = new Sink(200 * 1024 * 1024, never.open);
  let why = null;
  sink.onerror = (w) => { why = w; };
  const mib = new Uint8Array(1024 * 1024);
  for (let i = 0; i < 200 && why === null; i++) sink.write(mib.buffer.slice(0));
  assert.match(why, /the disk could not keep up \(12\d MB waiting to be written\)/);
});

test('in memory, a file over the limit is refused when accepted, with why', async () => {
  const sink = new Sink(MEMORY_LIMIT + 1);
  const why = await new Promise((resolve) => { sink.onerror = resolve; });
  assert.match(why, /this browser can keep files of at most 512 MB/);
});
