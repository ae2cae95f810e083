// A live broadcast, between real headless Chromium pages: some take part,
// an audience joins by the room's link to watch. The audience receives
// everyone taking part and sends nothing; it connects to those taking
// part alone, never to each other, and is shown to them only as a count.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { ARTIFACTS, serverAndBrowser, joinCall, askToJoin, waitForRemoteVideos, eventually, writeChat, isTestAddress, assertOnlyTestAddresses, connectionReport, startPeer } from './lib.js';

let server;
let browser;
serverAndBrowser({}, (s, b) => { server = s; browser = b; });

const count = (page) => page.locator('#call-count').textContent();
const log = (page) => page.getByRole('log', { name: 'Messages' });

/** Per open connection of `page`: the negotiated direction of each media section. */
const directions = (page) => page.evaluate(() => window.__pcs
  .filter((pc) => pc.connectionState !== 'closed')
  .map((pc) => pc.getTransceivers().filter((t) => t.mid !== null).map((t) => t.currentDirection)));

/** Whether `page` asked for a camera or microphone, or sends any track. */
const sendsAnything = (page) => page.evaluate(() => window.__pcs.some((pc) => pc.getSenders().some((s) => s.track)));

test('an audience watches those taking part, unseen, unheard and apart from each other', async () => {
  const room = `watch-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const vi = await joinCall(browser, server.url, room, 'Vi', { watch: true });
  const wu = await joinCall(browser, server.url, room, 'Wu', { watch: true });

  // Each of the audience sees Alice, and nothing of the other.
  for (const page of [vi, wu]) {
    await waitForRemoteVideos(page, 1);
    assert.equal(await count(page), 'Watching · 1 taking part');
    assert.equal(await page.locator('.tile.local').count(), 0, 'no tile of one\'s own');
    for (const id of ['mute-btn', 'camera-btn', 'screen-btn', 'lock-btn']) {
      assert.equal(await page.locator(`#${id}`).isVisible(), false, `${id} hidden`);
    }
  }
  const viId = await vi.evaluate(() => window.__callisto.id);
  const wuId = await wu.evaluate(() => window.__callisto.id);
  for (const [page, other] of [[vi, wuId], [wu, viId]]) {
    const mentioned = await page.evaluate((id) => JSON.stringify(window.__received).includes(id), other);
    assert.equal(mentioned, false, 'the server never named the rest of the audience');
    assert.equal((await directions(page)).length, 1, 'one connection: to Alice');
  }

  // Alice counts them, shows no tile for them, and sends to them one way.
  await eventually(async () => (await count(alice)) === 'Only you so far · 2 watching', 10000, 'Alice counts the audience');
  assert.equal(await alice.locator('.tile:not(.local)').count(), 0);
  await eventually(async () => (await directions(alice)).length === 2 && (await directions(alice)).every((d) => d.length === 4 && d.every((x) => x === 'sendonly')), 10000, 'Alice sends, and receives nothing');
  assert.deepEqual(await directions(vi), [['recvonly', 'recvonly', 'recvonly', 'recvonly']]);
  assert.equal(await sendsAnything(vi), false);
  assert.equal(await vi.evaluate(() => Boolean(document.querySelector('#preview')?.srcObject)), false, 'no camera was asked for');

  // Bob takes part: he and Alice see each other; the audience sees both.
  const bob = await joinCall(browser, server.url, room, 'Bob');
  await waitForRemoteVideos(bob, 1);
  await waitForRemoteVideos(alice, 1);
  for (const page of [vi, wu]) {
    await waitForRemoteVideos(page, 2);
    assert.equal(await count(page), 'Watching · 2 taking part');
  }
  await eventually(async () => (await count(bob)) === '2 people · 2 watching', 10000, 'Bob counts two taking part and two watching');

  // A question from the audience reaches those taking part, not the rest of it.
  await vi.getByRole('button', { name: 'Chat', exact: true }).click();
  await writeChat(vi, 'A question from Vi');
  for (const page of [alice, bob]) {
    await page.getByRole('button', { name: 'Chat (1 new)' }).waitFor({ timeout: 5000 });
  }
  await alice.getByRole('button', { name: 'Chat (1 new)' }).click();
  await log(alice).locator('.message', { hasText: 'A question from Vi' }).waitFor({ timeout: 1000 });
  await writeChat(alice, 'An answer for everyone');
  await wu.getByRole('button', { name: 'Chat (1 new)' }).waitFor({ timeout: 5000 });
  await wu.getByRole('button', { name: 'Chat (1 new)' }).click();
  assert.equal(await log(wu).locator('.message', { hasText: 'A question from Vi' }).count(), 0);
  await log(wu).locator('.message', { hasText: 'An answer for everyone' }).waitFor({ timeout: 1000 });
  // Alice answers Vi alone: the audience is in her "To", marked as watching.
  await alice.getByLabel('To', { exact: true }).selectOption({ label: 'Vi (watching)' });
  await writeChat(alice, 'Just for Vi');
  await log(vi).locator('.message', { hasText: 'Just for Vi' }).waitFor({ timeout: 5000 });
  await alice.getByLabel('To', { exact: true }).selectOption({ label: 'Everyone' });
  await writeChat(alice, 'For everyone again');
  await log(wu).locator('.message', { hasText: 'For everyone again' }).waitFor({ timeout: 5000 });
  assert.equal(await log(wu).locator('.message', { hasText: 'Just for Vi' }).count(), 0);
  for (const [page, file] of [[wu, 'watch.png'], [alice, 'watch-speaker.png']]) {
    const shot = path.join(ARTIFACTS, file);
    await page.screenshot({ path: shot });
    console.log(`# artifact: ${shot}`);
  }

  // Only test addresses: every selected pair, and every socket.
  for (const page of [alice, bob, vi, wu]) {
    for (const { pair } of await connectionReport(page)) {
      assert.ok(pair && isTestAddress(pair.local.address) && isTestAddress(pair.remote.address), JSON.stringify(pair));
    }
  }
  assertOnlyTestAddresses();

  // Vi goes: the count follows.
  await vi.getByRole('button', { name: 'Leave' }).click();
  await eventually(async () => (await count(alice)) === '2 people · 1 watching', 10000, 'Alice sees Vi gone');

  // Wu takes part: from the audience, through the pre-join screen with
  // her camera, into the call, seen by all.
  await wu.getByRole('button', { name: 'Take part' }).click();
  await wu.getByRole('button', { name: 'Join', exact: true }).waitFor({ timeout: 10000 });
  await eventually(async () => (await count(alice)) === '2 people', 10000, 'Alice sees Wu leave the audience');
  await wu.getByRole('button', { name: 'Join', exact: true }).click();
  await wu.getByRole('button', { name: 'Mute' }).waitFor({ timeout: 10000 });
  await waitForRemoteVideos(wu, 2);
  await waitForRemoteVideos(alice, 2);
  assert.equal(await count(alice), '3 people');
  for (const page of [alice, bob, vi, wu]) await page.context().close();
});

test('the native peer watches: it meets only those taking part, and receives their media', async () => {
  const room = `watch-native-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const vi = await joinCall(browser, server.url, room, 'Vi', { watch: true });
  await waitForRemoteVideos(vi, 1);
  const robot = await startPeer(server.url, room, 'Robo', ['--watch']);
  try {
    const joined = await robot.waitFor((e) => e.event === 'joined', 'joined');
    assert.deepEqual(joined.peers.map((p) => p.name), ['Alice'], 'Vi, watching too, is not listed');
    await robot.waitFor((e) => e.event === 'connected', 'connected to Alice');
    await eventually(async () => (await count(alice)) === 'Only you so far · 2 watching', 10000, 'Alice counts the robot as watching');
    // Its chat reaches Alice, not Vi.
    for (const page of [alice, vi]) await page.getByRole('button', { name: 'Chat', exact: true }).click();
    robot.say('a question from the robot');
    await log(alice).locator('.message', { hasText: 'a question from the robot' }).waitFor({ timeout: 10000 });
    await writeChat(alice, 'noted');
    await log(vi).locator('.message', { hasText: 'noted' }).waitFor({ timeout: 10000 });
    assert.equal(await log(vi).locator('.message', { hasText: 'a question from the robot' }).count(), 0);
    // Media from Alice's fake camera and microphone, for a while.
    await new Promise((r) => setTimeout(r, 3000));
  } finally {
    const { code, left } = await robot.stop();
    assert.equal(code, 0);
    assert.equal(left.peers.length, 1);
    assert.ok(left.peers[0].videoFrames > 20 && left.peers[0].audioFrames > 50, `media from Alice: ${JSON.stringify(left.peers[0])}`);
  }
  for (const page of [alice, vi]) await page.context().close();
});

test('a room locked but open to its audience: who comes to watch comes in, who would take part knocks', async () => {
  const room = `stage-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  await alice.getByRole('button', { name: 'Lock room' }).click();
  const open = alice.getByRole('button', { name: 'Open to audience' });
  await open.click();
  await eventually(async () => (await open.getAttribute('aria-pressed')) === 'true', 5000, 'the room is open to its audience');
  await alice.getByText('You opened the locked room to its audience').waitFor({ timeout: 5000 });

  // Vi comes to watch, and is in without asking.
  const vi = await joinCall(browser, server.url, room, 'Vi', { watch: true });
  await waitForRemoteVideos(vi, 1);
  await eventually(async () => (await count(alice)) === 'Only you so far · 1 watching', 10000, 'Alice counts Vi');

  // From the audience onto the stage: Vi knocks, as Bob does.
  await vi.getByRole('button', { name: 'Take part' }).click();
  await vi.getByRole('button', { name: 'Join', exact: true }).click();
  await vi.getByText('This room is locked. Waiting for someone inside to let you in…').waitFor({ timeout: 10000 });
  const bob = await askToJoin(browser, server.url, room, 'Bob');
  await bob.getByText('This room is locked. Waiting for someone inside to let you in…').waitFor({ timeout: 10000 });
  await alice.getByRole('button', { name: 'Let Bob in' }).click();
  await waitForRemoteVideos(bob, 1);
  await alice.getByRole('button', { name: 'Turn Vi away' }).click();
  await vi.getByText('Someone in the room turned you away.', { exact: false }).waitFor({ timeout: 5000 });

  // Locked to all again: the next to come to watch knocks too.
  await open.click();
  await eventually(async () => (await open.getAttribute('aria-pressed')) === 'false', 5000, 'closed to the audience');
  const wu = await askToJoin(browser, server.url, room, 'Wu', { watch: true });
  await wu.getByText('This room is locked. Waiting for someone inside to let you in…').waitFor({ timeout: 10000 });
  for (const page of [alice, bob, vi, wu]) await page.context().close();
});
