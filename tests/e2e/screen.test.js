// Screen sharing between real headless Chromium pages. Chromium's fake
// media flags give getDisplayMedia a fake screen ("screen:…"), as they
// give getUserMedia a fake camera.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { ARTIFACTS, serverAndBrowser, joinCall, waitForRemoteVideos, playingRemotes, eventually } from './lib.js';

let server;
let browser;
serverAndBrowser({}, (s, b) => { server = s; browser = b; });

/** The label of the video track a page sends on each of its connections (null: none). */
const sentVideo = (page) => page.evaluate(() => [...window.__callisto.links.values()]
  .map((l) => l.pc.getTransceivers().find((t) => t.receiver.track.kind === 'video')?.sender.track?.label ?? null));
const isScreen = (label) => Boolean(label?.startsWith('screen:'));
const tileOf = (page, id) => page.locator(`.tile[data-peer-id="${id}"]`);

test('a shared screen replaces the camera for everyone, newcomers too, until it is stopped', async () => {
  const room = `screen-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  await waitForRemoteVideos(alice, 1);
  await waitForRemoteVideos(bob, 1);
  const aliceId = await alice.evaluate(() => window.__callisto.id);
  const [camera] = await sentVideo(alice);
  assert.ok(camera && !isScreen(camera), `Alice sends her camera first (${camera})`);

  const share = alice.getByRole('button', { name: 'Share screen' });
  await share.click();
  const stop = alice.getByRole('button', { name: 'Stop sharing' });
  await stop.waitFor({ timeout: 5000 });
  assert.equal(await stop.getAttribute('aria-pressed'), 'true');
  await eventually(async () => (await sentVideo(alice)).every(isScreen), 5000, 'Alice sends her screen');
  await tileOf(bob, aliceId).and(bob.locator('.screen')).waitFor({ timeout: 5000 });
  assert.ok(await tileOf(bob, aliceId).getByText('Sharing screen').isVisible());
  await tileOf(alice, 'local').and(alice.locator('.screen')).waitFor();
  await waitForRemoteVideos(bob, 1); // the screen plays where the camera did
  const states = await alice.evaluate(() => [...window.__callisto.links.values()].map((l) => l.pc.signalingState));
  assert.deepEqual(states, ['stable'], 'no renegotiation');

  // Carol comes while Alice shares: she gets the screen from the start.
  const carol = await joinCall(browser, server.url, room, 'Carol');
  await eventually(async () => {
    const labels = await sentVideo(alice);
    return labels.length === 2 && labels.every(isScreen);
  }, 10000, 'Alice sends her screen to Carol too');
  await tileOf(carol, aliceId).and(carol.locator('.screen')).waitFor({ timeout: 10000 });
  await waitForRemoteVideos(carol, 2);
  const shot = path.join(ARTIFACTS, 'screen-share.png');
  await carol.screenshot({ path: shot });
  console.log(`# artifact: ${shot}`);

  // Alice stops in the browser's own sharing bar: Chromium ends the track.
  await alice.evaluate(() => {
    const [link] = window.__callisto.links.values();
    link.pc.getSenders().find((s) => s.track?.label.startsWith('screen:')).track.dispatchEvent(new Event('ended'));
  });
  await share.waitFor({ timeout: 5000 });
  await eventually(async () => (await sentVideo(alice)).every((l) => l === camera), 5000, 'Alice sends her camera again');
  for (const page of [bob, carol]) {
    await tileOf(page, aliceId).and(page.locator('.tile:not(.screen)')).waitFor({ timeout: 5000 });
    await waitForRemoteVideos(page, 2);
  }
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
  assert.deepEqual(await sentVideo(viewer), [null, null]);

  await viewer.getByRole('button', { name: 'Share screen' }).click();
  await viewer.getByRole('button', { name: 'Stop sharing' }).waitFor({ timeout: 5000 });
  for (const page of [first, last]) {
    await tileOf(page, viewerId).and(page.locator('.screen')).waitFor({ timeout: 5000 });
    await eventually(async () => (await playingRemotes(page)).includes(viewerId), 15000, 'the viewer\'s screen plays');
  }
  const states = await viewer.evaluate(() => [...window.__callisto.links.values()].map((l) => l.pc.signalingState));
  assert.deepEqual(states, ['stable', 'stable'], 'no renegotiation');

  // Stopping leaves the viewer's tile as it was: camera off, no video.
  await viewer.getByRole('button', { name: 'Stop sharing' }).click();
  for (const page of [first, last]) {
    await tileOf(page, viewerId).and(page.locator('.camera-off:not(.screen)')).waitFor({ timeout: 5000 });
  }
  assert.deepEqual(await sentVideo(viewer), [null, null]);
  for (const p of [first, viewer, last]) await p.context().close();
});
