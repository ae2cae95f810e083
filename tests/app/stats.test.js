// The live stats' summary (stats.js) of getStats() reports: the path, round
// trip, rates and loss it reads from a report shaped like Chromium's, and
// that no report, however odd, makes it throw or show nonsense.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { describe, summarize } from '../../crates/web/app/js/stats.js';
import { runs } from './props.js';

/** A report of a relayed or direct connection at `t` ms, with these counters. */
function report({ t, bytesIn, bytesOut, local = { candidateType: 'host', protocol: 'udp' }, lost = 0 }) {
  return [
    { id: 'T1', type: 'transport', timestamp: t, selectedCandidatePairId: 'CP1' },
    { id: 'CP1', type: 'candidate-pair', timestamp: t, localCandidateId: 'L1', remoteCandidateId: 'R1', currentRoundTripTime: 0.0123, nominated: true, state: 'succeeded' },
    { id: 'L1', type: 'local-candidate', timestamp: t, ...local },
    { id: 'R1', type: 'remote-candidate', timestamp: t, candidateType: 'host', protocol: 'udp' },
    { id: 'IV', type: 'inbound-rtp', kind: 'video', timestamp: t, bytesReceived: bytesIn - 1000, packetsReceived: 990, packetsLost: lost, frameWidth: 1280, frameHeight: 720, framesPerSecond: 29.7 },
    { id: 'IA', type: 'inbound-rtp', kind: 'audio', timestamp: t, bytesReceived: 1000, packetsReceived: 10, packetsLost: 0 },
    { id: 'OV', type: 'outbound-rtp', kind: 'video', timestamp: t, bytesSent: bytesOut },
  ];
}

test('with a shared screen beside the camera, the camera\'s video is the one described, and the screen on a line of its own', () => {
  const withScreen = (screenFirst) => {
    const base = report({ t: 1000, bytesIn: 100_000, bytesOut: 50_000 }).map((s) => (s.id === 'IV' ? { ...s, mid: '1' } : s));
    const screen = { id: 'IS', type: 'inbound-rtp', kind: 'video', mid: '2', timestamp: 1000, bytesReceived: 5000, packetsReceived: 10, packetsLost: 0, frameWidth: 1920, frameHeight: 1080, framesPerSecond: 5 };
    return screenFirst ? [screen, ...base] : [...base, screen];
  };
  for (const screenFirst of [true, false]) {
    const camera = summarize(withScreen(screenFirst), null, '1');
    assert.deepEqual(camera.video, { width: 1280, height: 720, fps: 29.7 });
    assert.deepEqual(camera.screen, { width: 1920, height: 1080, fps: 5 });
    assert.deepEqual(describe(camera).slice(2, 4), [['Receiving', '1280×720, 30 fps'], ['Screen', '1920×1080, 5 fps']]);
    assert.deepEqual(summarize(withScreen(screenFirst), null, '2').video, { width: 1920, height: 1080, fps: 5 });
  }
  // No screen shared: its receiver decodes nothing, and no line shows.
  const alone = summarize(report({ t: 1000, bytesIn: 100_000, bytesOut: 50_000 }).map((s) => (s.id === 'IV' ? { ...s, mid: '1' } : s)), null, '1');
  assert.equal(alone.screen, null);
  assert.ok(!describe(alone).some(([k]) => k === 'Screen'));
});

test('a direct connection: its path, round trip, rates from two samples, and loss', () => {
  const first = summarize(report({ t: 1000, bytesIn: 100_000, bytesOut: 50_000, lost: 0 }));
  assert.equal(first.inKbps, null, 'no rate from one sample');
  const next = summarize(report({ t: 2000, bytesIn: 225_000, bytesOut: 100_000, lost: 10 }), first.sample);
  assert.equal(next.path.text, 'direct (UDP)');
  assert.equal(next.rttMs, 12);
  assert.equal(next.inKbps, 1000, '125,000 bytes in a second');
  assert.equal(next.outKbps, 400);
  assert.equal(next.lossPercent.toFixed(2), '0.99', '10 lost of 1,010');
  assert.deepEqual(describe(next), [
    ['Path', 'direct (UDP)'],
    ['Round trip', '12 ms'],
    ['Receiving', '1280×720, 30 fps, 1,000 kbit/s'],
    ['Sending', '400 kbit/s'],
    ['Lost', '1.0 %'],
  ]);
});

test('a relayed connection says over what, and a counter that went back shows no rate', () => {
  const first = summarize(report({ t: 1000, bytesIn: 100_000, bytesOut: 50_000, local: { candidateType: 'relay', protocol: 'udp', relayProtocol: 'tls' } }));
  const next = summarize(report({ t: 2000, bytesIn: 90_000, bytesOut: 60_000, local: { candidateType: 'relay', protocol: 'udp', relayProtocol: 'tls' } }), first.sample);
  assert.equal(next.path.text, 'relayed (TURN over TLS)');
  assert.equal(next.path.kind, 'relayed');
  assert.equal(next.inKbps, null, 'bytes received went down (a stream ended): no rate');
  assert.equal(next.outKbps, 80);
  assert.equal(summarize([]).path, null);
  assert.deepEqual(describe(summarize([])), [['Path', 'not connected']]);
});

// Entries of every type with fields of every kind, as a buggy or future
// browser might give.
const field = fc.oneof(fc.double(), fc.integer(), fc.string(), fc.constant(null), fc.constant(undefined), fc.boolean());
const entry = fc.record({
  id: fc.oneof(fc.constantFrom('T1', 'CP1', 'L1', 'IV', 'OV'), fc.string(), fc.integer()),
  type: fc.constantFrom('transport', 'candidate-pair', 'local-candidate', 'inbound-rtp', 'outbound-rtp', 'codec', 'other'),
  kind: fc.constantFrom('audio', 'video', 'x'),
  timestamp: field,
  selectedCandidatePairId: fc.oneof(fc.constantFrom('CP1'), field),
  localCandidateId: fc.oneof(fc.constantFrom('L1'), field),
  candidateType: fc.oneof(fc.constantFrom('host', 'srflx', 'prflx', 'relay'), field),
  protocol: field,
  relayProtocol: field,
  currentRoundTripTime: field,
  bytesReceived: field,
  bytesSent: field,
  packetsReceived: field,
  packetsLost: field,
  frameWidth: field,
  frameHeight: field,
  framesPerSecond: field,
  nominated: field,
  state: fc.oneof(fc.constant('succeeded'), field),
}, { requiredKeys: ['id', 'type'] });

test('any report gives a summary of finite, non-negative numbers or none, and lines of text', () => {
  fc.assert(fc.property(fc.array(entry, { maxLength: 12 }), fc.array(entry, { maxLength: 12 }), (a, b) => {
    const first = summarize(a);
    const next = summarize(b, first.sample);
    for (const s of [first, next]) {
      for (const v of [s.rttMs, s.inKbps, s.outKbps, s.lossPercent]) {
        assert.ok(v === null || (Number.isFinite(v) && v >= 0), `a number shown: ${v}`);
      }
      if (s.lossPercent !== null) assert.ok(s.lossPercent <= 100);
      for (const [label, value] of describe(s)) {
        assert.equal(typeof label, 'string');
        assert.equal(typeof value, 'string');
        assert.doesNotMatch(value, /NaN|undefined|Infinity/);
      }
    }
  }), { numRuns: runs });
});
