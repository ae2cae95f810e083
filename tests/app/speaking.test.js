// Property tests of who is marked speaking (speaking.js): from any
// sequence of levels over time, a person is marked exactly while their
// last loud moment is less than the hold time ago, and each change is
// told once; talk while muted is told by the rule, and not too often.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { HOLD_MS, MUTED_TALK_AGAIN_MS, MUTED_TALK_MS, MUTED_TALK_WINDOW_MS, MutedTalk, SPEECH_LEVEL, Speaking } from '../../crates/web/app/js/speaking.js';
import { runs } from './props.js';

const level = fc.oneof(
  fc.constant(null),
  fc.double({ min: 0, max: 1, noNaN: true }),
  fc.constantFrom(SPEECH_LEVEL, SPEECH_LEVEL * 1.0001, 0),
);
const sample = fc.record({ id: fc.constantFrom('a', 'b', 'local'), level, after: fc.integer({ min: 0, max: HOLD_MS * 2 }) });
const step = fc.oneof({ weight: 12, arbitrary: sample }, { weight: 1, arbitrary: fc.record({ forget: fc.constantFrom('a', 'b') }) });

test('a person is marked exactly while their last loud moment is under the hold time ago, each change told once', () => {
  fc.assert(fc.property(fc.array(step, { maxLength: 80 }), (steps) => {
    const speaking = new Speaking();
    const lastLoud = new Map(); // the model
    const shown = new Map(); // what the changes told so far
    let now = 0;
    for (const s of steps) {
      if (s.forget) {
        speaking.forget(s.forget);
        lastLoud.delete(s.forget);
        shown.delete(s.forget);
        continue;
      }
      now += s.after;
      if (s.level !== null && s.level > SPEECH_LEVEL) lastLoud.set(s.id, now);
      const expected = lastLoud.has(s.id) && now - lastLoud.get(s.id) < HOLD_MS;
      const change = speaking.update(s.id, s.level, now);
      const before = shown.get(s.id) ?? false;
      if (expected === before) assert.equal(change, undefined, `no change told at ${now}`);
      else assert.equal(change, expected, `the change at ${now}`);
      shown.set(s.id, expected);
    }
  }), { numRuns: runs });
});

test('a single loud moment marks for the hold time, no longer', () => {
  const speaking = new Speaking();
  assert.equal(speaking.update('a', 0.5, 1000), true);
  assert.equal(speaking.update('a', 0, 1000 + HOLD_MS - 1), undefined);
  assert.equal(speaking.update('a', 0, 1000 + HOLD_MS), false);
  assert.equal(speaking.update('a', null, 5000), undefined, 'unknown is silence');
});

test('talk while muted is told: not a single noise, and not again for a while', () => {
  const talk = new MutedTalk();
  // A door slam: loud for 300 ms, then quiet.
  for (let t = 0; t <= 300; t += 150) assert.equal(talk.update(0.5, t), false, `slam at ${t}`);
  for (let t = 450; t < 3000; t += 150) assert.equal(talk.update(0.001, t), false, `quiet at ${t}`);
  // Beeps (or words) a second apart: told at the second.
  assert.equal(talk.update(0.3, 3000), false);
  assert.equal(talk.update(0.3, 3000 + MUTED_TALK_MS - 1), false);
  assert.equal(talk.update(0.3, 4000), true);
  // Talk goes on: not told again until MUTED_TALK_AGAIN_MS have passed.
  for (let t = 4150; t < 4000 + MUTED_TALK_AGAIN_MS; t += 150) assert.equal(talk.update(0.3, t), false, `again at ${t}`);
  assert.equal(talk.update(0.3, 4000 + MUTED_TALK_AGAIN_MS), true);
  // Unmuting forgets what was heard.
  const other = new MutedTalk();
  other.update(0.3, 0);
  other.reset();
  assert.equal(other.update(0.3, 600), false);
});

test('talk while muted is told exactly when loud moments span the talk time within the window, at most every so often', () => {
  fc.assert(fc.property(fc.array(fc.record({ level: fc.double({ min: 0, max: 1, noNaN: true }), after: fc.integer({ min: 1, max: 1500 }) }), { maxLength: 120 }), (samples) => {
    const talk = new MutedTalk();
    let loud = [];
    let toldAt = -Infinity;
    let now = 0;
    for (const { level, after } of samples) {
      now += after;
      loud = loud.filter((t) => now - t < MUTED_TALK_WINDOW_MS);
      if (level > SPEECH_LEVEL) loud.push(now);
      const expected = loud.length > 0 && now - toldAt >= MUTED_TALK_AGAIN_MS && loud.at(-1) - loud[0] >= MUTED_TALK_MS;
      if (expected) { toldAt = now; loud = []; }
      assert.equal(talk.update(level, now), expected, `at ${now}`);
    }
  }), { numRuns: runs });
});
