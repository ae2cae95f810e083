// Property tests of how our uplink is shared between connections
// (bitrate.js): each connection's share never exceeds the budget, the
// shares together stay within it unless the floor holds them up, and
// more connections never get more each.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { CAMERA_BUDGET, CAMERA_FLOOR, SCREEN_BUDGET, SCREEN_FLOOR, shares } from '../../crates/web/app/js/bitrate.js';
import { runs } from './props.js';

test('each connection gets a share of one budget, never below the floor, fewer each as there are more', () => {
  fc.assert(fc.property(fc.integer({ min: -2, max: 200 }), (n) => {
    const got = shares(n);
    const more = shares(n + 1);
    for (const [kind, budget, floor] of [['camera', CAMERA_BUDGET, CAMERA_FLOOR], ['screen', SCREEN_BUDGET, SCREEN_FLOOR]]) {
      const each = got[kind];
      assert.ok(Number.isInteger(each) && each >= floor && each <= budget, `${kind} for ${n}: ${each}`);
      if (each > floor) assert.ok(each * Math.max(1, n) <= budget, `${kind}: ${n} shares of ${each} within ${budget}`);
      assert.ok(more[kind] <= each, `${kind}: ${n + 1} connections get no more each than ${n}`);
    }
  }), { numRuns: runs });
  assert.deepEqual(shares(1), { camera: CAMERA_BUDGET, screen: SCREEN_BUDGET });
  assert.deepEqual(shares(2), { camera: 1_250_000, screen: 2_000_000 });
  assert.deepEqual(shares(15), { camera: 166_666, screen: 300_000 });
});
