// Screen sharing between real headless Chromium pages. Chromium's fake
// media flags give getDisplayMedia a fake screen ("screen:…") and, asked
// for the screen's sound, a fake one (a beep), as they give getUserMedia a
// fake camera and microphone.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { ARTIFACTS, serverAndBrowser, joinCall, waitForRemoteVideos, playingRemotes, eventually, descriptions } from './lib.js';

let server;
let browser;
serverAndBrowser({}, (s, b) => { server = s; browser = b; });

/**
 * The labels of the video tracks a page sends on each of its connections,
 * camera first, then screen (null: none).
 */
const sentVideo = (page) => page.evaluate(() => [...window.__callisto.links.values()]
  .map((l) => l.pc.getTransceivers().filter((t) => t.receiver.track.kind === 'video')
    .map((t) => t.sender.track?.label ?? null)));
const isScreen = (label) => Boolean(label?.startsWith('screen:'));
const tileOf = (page, id) => page.locator(`.tile[data-peer-id="${id}"]`);

/**
 * The sound of `peerId`'s shared screen at `page`: packets and energy
 * received on the connection's second audio, and whether the screen's
 * tile holds a live audio track.
 */
const screenSound = (page, peerId) => page.evaluate(async (peerId) => {
  const link = window.__callisto.links.get(peerId);
  const mid = link.pc.getTransceivers().filter((t) => t.receiver.track.kind === 'audio')[1]?.mid;
  let sound = { packets: 0, energy: 0 };
  (await link.pc.getStats()).forEach((s) => {
    if (s.type === 'inbound-rtp' && s.mid === mid) sound = { packets: s.packetsReceived, energy: s.totalAudioEnergy ?? 0 };
  });
  const video = document.querySelector(`.tile[data-peer-id="${CSS.escape(peerId)}/screen"] video`);
  return { ...sound, inTile: Boolean(video?.srcObject?.getAudioTracks().some((t) => t.readyState === 'live')) };
}, peerId);

/** Waits until the sound of `peerId`'s screen keeps arriving at `page`, and plays in its tile. */
async function screenSoundFlows(page, peerId, label) {
  const first = await screenSound(page, peerId);
  await eventually(async () => {
    const later = await screenSound(page, peerId);
    return later.inTile && later.packets > first.packets + 20 && later.energy > first.energy;
  }, 10000, `${label}: the screen's sound arrives`);
}

test('a shared screen goes beside the camera to everyone, newcomers too, until it is stopped', async () => {
  const room = `screen-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  await waitForRemoteVideos(alice, 1);
  await waitForRemoteVideos(bob, 1);
  const aliceId = await alice.evaluate(() => window.__callisto.id);
  const [[camera, none]] = await sentVideo(alice);
  assert.ok(camera && !isScreen(camera) && none === null, `Alice sends her camera alone first (${camera}, ${none})`);
  const before = await Promise.all([alice, bob].map(descriptions));

  const share = alice.getByRole('button', { name: 'Share screen' });
  await share.click();
  const stop = alice.getByRole('button', { name: 'Stop sharing' });
  await stop.waitFor({ timeout: 5000 });
  assert.equal(await stop.getAttribute('aria-pressed'), 'true');
  await eventually(async () => (await sentVideo(alice)).every(([c, s]) => c === camera && isScreen(s)), 5000, 'Alice sends her camera and her screen');
  // Bob sees both: her camera's tile, and her screen's beside it.
  const screenTile = tileOf(bob, `${aliceId}/screen`);
  await screenTile.waitFor({ timeout: 5000 });
  assert.equal(await screenTile.getAttribute('aria-label'), 'Screen of Alice');
  assert.ok(await screenTile.evaluate((t) => t.classList.contains('screen')));
  await eventually(async () => {
    const playing = await playingRemotes(bob);
    return playing.includes(aliceId) && playing.includes(`${aliceId}/screen`);
  }, 15000, 'Alice\'s camera and screen both play at Bob\'s');
  const order = (page) => page.evaluate(() => [...document.querySelectorAll('.tile')].map((t) => t.dataset.peerId));
  assert.deepEqual(await order(bob), [aliceId, `${aliceId}/screen`, 'local'], 'her screen right after her camera');
  await tileOf(alice, 'local/screen').waitFor();
  assert.deepEqual(await order(alice), ['local', 'local/screen', await bob.evaluate(() => window.__callisto.id)]);
  assert.equal(await tileOf(alice, 'local/screen').getAttribute('aria-label'), 'Screen of Alice (you)');
  // At Bob, her screen is pinned: shown large, the cameras beside it. Not
  // at Alice: she need not see her own screen large.
  const pinned = (page) => page.evaluate(() => ({
    grid: document.getElementById('grid').classList.contains('has-pinned'),
    tile: document.querySelector('.tile.pinned')?.dataset.peerId ?? null,
  }));
  assert.deepEqual(await pinned(bob), { grid: true, tile: `${aliceId}/screen` });
  assert.deepEqual(await pinned(alice), { grid: false, tile: null });
  const width = (tile) => tile.evaluate((t) => t.getBoundingClientRect().width);
  assert.ok(await width(screenTile) > 2 * await width(tileOf(bob, aliceId)), 'the pinned screen is larger than her camera');
  // Bob unpins it by keyboard, and pins Alice's camera instead.
  await bob.getByRole('button', { name: 'Unpin Screen of Alice' }).focus();
  await bob.keyboard.press('Enter');
  assert.deepEqual(await pinned(bob), { grid: false, tile: null });
  await tileOf(bob, aliceId).hover();
  await bob.getByRole('button', { name: 'Pin Alice: show it large' }).click();
  assert.deepEqual(await pinned(bob), { grid: true, tile: aliceId });
  assert.equal(await bob.getByRole('button', { name: 'Unpin Alice' }).getAttribute('aria-pressed'), 'true');
  // And shows her screen full screen, then not.
  await screenTile.hover();
  await bob.getByRole('button', { name: 'Show Screen of Alice full screen' }).click();
  await eventually(() => bob.evaluate(() => document.fullscreenElement?.dataset.peerId), 5000, 'full screen')
    .then((id) => assert.equal(id, `${aliceId}/screen`));
  await bob.getByRole('button', { name: 'Exit full screen' }).click();
  await eventually(() => bob.evaluate(() => document.fullscreenElement === null), 5000, 'full screen left');
  // The screen's sound goes with it (not played back to Alice herself).
  await screenSoundFlows(bob, aliceId, 'Bob');
  assert.equal(await tileOf(alice, 'local/screen').locator('video').evaluate((v) => v.srcObject.getAudioTracks().length), 0);
  assert.deepEqual(await Promise.all([alice, bob].map(descriptions)), before, 'no renegotiation');

  // Carol comes while Alice shares: she gets both from the start.
  const carol = await joinCall(browser, server.url, room, 'Carol');
  await eventually(async () => {
    const sent = await sentVideo(alice);
    return sent.length === 2 && sent.every(([c, s]) => c === camera && isScreen(s));
  }, 10000, 'Alice sends her screen to Carol too');
  await tileOf(carol, `${aliceId}/screen`).waitFor({ timeout: 10000 });
  await waitForRemoteVideos(carol, 3); // Alice's camera and screen, Bob's camera
  assert.deepEqual(await pinned(carol), { grid: true, tile: `${aliceId}/screen` });
  await screenSoundFlows(carol, aliceId, 'Carol');
  const shot = path.join(ARTIFACTS, 'screen-share.png');
  await carol.screenshot({ path: shot });
  console.log(`# artifact: ${shot}`);

  // Alice stops in the browser's own sharing bar: Chromium ends the track.
  await alice.evaluate(() => {
    const [link] = window.__callisto.links.values();
    link.pc.getSenders().find((s) => s.track?.label.startsWith('screen:')).track.dispatchEvent(new Event('ended'));
  });
  await share.waitFor({ timeout: 5000 });
  await eventually(async () => (await sentVideo(alice)).every(([c, s]) => c === camera && s === null), 5000, 'Alice sends her camera alone again');
  for (const page of [bob, carol]) {
    await tileOf(page, `${aliceId}/screen`).waitFor({ state: 'detached', timeout: 5000 });
    await waitForRemoteVideos(page, 2);
  }
  assert.equal(await tileOf(alice, 'local/screen').count(), 0);
  // Carol's pinned screen went with it; Bob's pinned camera stays.
  assert.deepEqual(await pinned(carol), { grid: false, tile: null });
  assert.deepEqual(await pinned(bob), { grid: true, tile: aliceId });
  // Its sound stopped too.
  const after = await screenSound(bob, aliceId);
  await bob.waitForTimeout(1000);
  assert.equal((await screenSound(bob, aliceId)).packets, after.packets, 'no more screen sound');
  assert.equal(await alice.evaluate(() => window.__callisto.links.values().next().value.pc.getTransceivers()
    .filter((t) => t.sender.track?.kind === 'audio').length), 1, 'Alice sends her microphone alone');
  for (const p of [alice, bob, carol]) await p.context().close();
});

test('someone without a camera shares a screen with those they offered to and those who offered to them', async () => {
  const room = `screen-nocam-${Date.now()}`;
  const first = await joinCall(browser, server.url, room, 'First');
  // The viewer offers to First (newcomers offer), and answers Last.
  const viewer = await joinCall(browser, server.url, room, 'Viewer', { noCamera: true });
  const last = await joinCall(browser, server.url, room, 'Last');
  await viewer.getByText(/receive-only/).waitFor();
  const viewerId = await viewer.evaluate(() => window.__callisto.id);
  for (const page of [first, last]) {
    // The other host's video plays; the viewer sends none.
    await eventually(async () => (await playingRemotes(page)).length === 1, 20000, 'the other host\'s video');
    await tileOf(page, viewerId).and(page.locator('.camera-off')).waitFor({ timeout: 10000 });
    assert.ok(!(await playingRemotes(page)).includes(viewerId), 'no video from the viewer yet');
  }
  assert.deepEqual(await sentVideo(viewer), [[null, null], [null, null]]);
  const before = await Promise.all([first, viewer, last].map(descriptions));

  await viewer.getByRole('button', { name: 'Share screen' }).click();
  await viewer.getByRole('button', { name: 'Stop sharing' }).waitFor({ timeout: 5000 });
  for (const page of [first, last]) {
    await tileOf(page, `${viewerId}/screen`).waitFor({ timeout: 5000 });
    await eventually(async () => (await playingRemotes(page)).includes(`${viewerId}/screen`), 15000, 'the viewer\'s screen plays');
  }
  assert.deepEqual(await Promise.all([first, viewer, last].map(descriptions)), before, 'no renegotiation');

  // Stopping leaves the viewer's tile as it was: camera off, no video.
  await viewer.getByRole('button', { name: 'Stop sharing' }).click();
  for (const page of [first, last]) {
    await tileOf(page, `${viewerId}/screen`).waitFor({ state: 'detached', timeout: 5000 });
    await tileOf(page, viewerId).and(page.locator('.camera-off')).waitFor({ timeout: 5000 });
  }
  assert.deepEqual(await sentVideo(viewer), [[null, null], [null, null]]);
  for (const p of [first, viewer, last]) await p.context().close();
});
