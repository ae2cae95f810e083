// A locked room, between real headless Chromium pages: newcomers knock and
// wait, seeing and seen by nobody, until someone in the call lets them in
// or turns them away.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { ARTIFACTS, serverAndBrowser, joinCall, askToJoin, waitForRemoteVideos, eventually } from './lib.js';

let server;
let browser;
serverAndBrowser({}, (s, b) => { server = s; browser = b; });

/** What the server sent `page` of its room: whether a welcome came, and the ICE servers in it. */
const told = (page) => page.evaluate(() => ({
  welcomed: window.__received.some((m) => m.type === 'welcome'),
  knocked: window.__received.some((m) => m.type === 'waiting'),
  iceServers: window.__received.some((m) => m.iceServers),
}));

/** Asks to join `room` as `name` and waits until the page says it knocks. */
async function knock(room, name) {
  const page = await askToJoin(browser, server.url, room, name);
  await page.getByText('This room is locked. Waiting for someone inside to let you in…').waitFor({ timeout: 10000 });
  return page;
}

test('in a locked room newcomers wait until someone in the call lets them in; turned away, they can ask again', async () => {
  const room = `lobby-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const lock = alice.getByRole('button', { name: 'Lock room' });
  await lock.click();
  const unlock = alice.getByRole('button', { name: 'Unlock room' });
  await unlock.waitFor({ timeout: 5000 });
  assert.equal(await unlock.getAttribute('aria-pressed'), 'true');
  await alice.getByText('You locked the room').waitFor();

  // Bob knocks: nobody sees him and he gets nothing of the room, TURN
  // credentials included.
  const bob = await knock(room, 'Bob');
  assert.deepEqual(await told(bob), { welcomed: false, knocked: true, iceServers: false });
  assert.equal(await alice.locator('.tile:not(.local)').count(), 0);
  await alice.getByText('Bob asks to join', { exact: false }).first().waitFor({ timeout: 5000 });
  const shot = path.join(ARTIFACTS, 'lobby-knock.png');
  await alice.screenshot({ path: shot });
  console.log(`# artifact: ${shot}`);

  // Alice lets him in: the call starts, both ways.
  await alice.getByRole('button', { name: 'Let Bob in' }).click();
  await bob.getByRole('button', { name: 'Leave' }).waitFor({ timeout: 10000 });
  await waitForRemoteVideos(alice, 1);
  await waitForRemoteVideos(bob, 1);
  assert.equal(await alice.getByRole('button', { name: 'Let Bob in' }).count(), 0, 'the knock is gone');
  assert.equal(await bob.getByRole('button', { name: 'Unlock room' }).getAttribute('aria-pressed'), 'true', 'Bob sees the room locked');

  // Carol knocks; Bob turns her away, by keyboard. She is told, and may ask again.
  const carol = await knock(room, 'Carol');
  const away = bob.getByRole('button', { name: 'Turn Carol away' });
  await away.waitFor({ timeout: 5000 });
  await away.focus();
  await bob.keyboard.press('Enter');
  await carol.getByText('Someone in the room turned you away. You can ask again.').waitFor({ timeout: 5000 });
  assert.equal(await carol.getByRole('button', { name: 'Join', exact: true }).isEnabled(), true);
  assert.equal((await told(carol)).welcomed, false);
  await eventually(async () => (await alice.getByRole('button', { name: 'Let Carol in' }).count()) === 0, 5000, 'Carol\'s knock is gone at Alice\'s too');

  // Dave knocks and stops waiting: his knock goes.
  const dave = await knock(room, 'Dave');
  await alice.getByRole('button', { name: 'Let Dave in' }).waitFor({ timeout: 5000 });
  await dave.getByRole('button', { name: 'Stop waiting' }).click();
  await alice.getByRole('button', { name: 'Let Dave in' }).waitFor({ state: 'detached', timeout: 5000 });
  assert.equal(await dave.getByRole('button', { name: 'Join', exact: true }).isEnabled(), true);

  // Carol asks again; Alice unlocks: she comes in, and so does whoever comes next.
  await carol.getByRole('button', { name: 'Join', exact: true }).click();
  await alice.getByRole('button', { name: 'Let Carol in' }).waitFor({ timeout: 5000 });
  await unlock.click();
  await carol.getByRole('button', { name: 'Leave' }).waitFor({ timeout: 10000 });
  await lock.waitFor({ timeout: 5000 });
  const erin = await joinCall(browser, server.url, room, 'Erin');
  await waitForRemoteVideos(erin, 3);
  for (const p of [alice, bob, carol, dave, erin]) await p.context().close();
});
