// Choosing the microphone, camera and speaker during a call, in real
// headless Chromium with its fake devices: three microphones, two cameras
// (asked for with device-count) and three speakers.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { ARTIFACTS, serverAndBrowser, joinCall, waitForRemoteVideos, connectionReport, eventually } from './lib.js';

let server;
let browser;
serverAndBrowser(
  { browserOptions: { extraArgs: ['--use-fake-device-for-media-stream=device-count=2'] } },
  (s, b) => { server = s; browser = b; },
);

/** The label and state of the track of `kind` each of the page's connections sends. */
const sent = (page, kind) => page.evaluate((kind) => [...window.__callisto.links.values()].map((l) => {
  const track = l.pc.getTransceivers().find((t) => t.receiver.track.kind === kind)?.sender.track;
  return track && { label: track.label, enabled: track.enabled, live: track.readyState === 'live' };
}), kind);

/** Audio packets `page` has received on each connection, once they keep coming. */
async function audioFlows(page, label) {
  const first = (await connectionReport(page)).map((c) => c.audio?.packets ?? 0);
  await eventually(async () => {
    const later = (await connectionReport(page)).map((c) => c.audio?.packets ?? 0);
    return later.length === first.length && later.every((n, i) => n > first[i] + 10);
  }, 5000, `${label}: audio keeps arriving`);
}

test('a microphone, camera and speaker chosen during the call are used at once, muted stays muted', async () => {
  const room = `devices-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  await waitForRemoteVideos(alice, 1);
  await waitForRemoteVideos(bob, 1);

  const open = alice.getByRole('button', { name: 'Devices' });
  await open.click();
  const dialog = alice.getByRole('dialog', { name: 'Devices' });
  await dialog.waitFor();
  const mic = dialog.getByLabel('Microphone');
  const camera = dialog.getByLabel('Camera');
  const speaker = dialog.getByLabel('Speaker');
  const labels = (select) => select.locator('option').allTextContents();
  assert.ok((await labels(mic)).includes('Fake Audio Input 2'), `microphones: ${await labels(mic)}`);
  assert.equal((await labels(camera)).length, 2, `cameras: ${await labels(camera)}`);
  assert.ok((await labels(speaker)).includes('Fake Audio Output 1'), `speakers: ${await labels(speaker)}`);
  assert.equal(await alice.evaluate(() => document.activeElement.id), 'mic-select', 'the keyboard starts in the dialog');
  const shot = path.join(ARTIFACTS, 'devices.png');
  await alice.screenshot({ path: shot });
  console.log(`# artifact: ${shot}`);

  // Another microphone: sent at once, and the old one let go.
  const [micBefore] = await sent(alice, 'audio');
  await alice.evaluate(() => {
    const [link] = window.__callisto.links.values();
    window.__oldMic = link.pc.getSenders().find((s) => s.track?.kind === 'audio').track;
  });
  await mic.selectOption({ label: 'Fake Audio Input 2' });
  await eventually(async () => (await sent(alice, 'audio')).every((t) => t.label === 'Fake Audio Input 2' && t.live), 5000, 'the new microphone is sent');
  assert.notEqual(micBefore.label, 'Fake Audio Input 2');
  await audioFlows(bob, 'Bob');
  assert.equal(await alice.evaluate(() => window.__oldMic.readyState), 'ended', 'the old microphone is released');

  // A muted microphone, switched: the new one goes out, still muted.
  await alice.keyboard.press('Escape');
  await dialog.waitFor({ state: 'hidden' });
  await alice.getByRole('button', { name: 'Mute' }).click();
  await open.click();
  await mic.selectOption({ label: 'Fake Audio Input 1' });
  await eventually(async () => (await sent(alice, 'audio')).every((t) => t.label === 'Fake Audio Input 1'), 5000, 'the third microphone is sent');
  assert.deepEqual((await sent(alice, 'audio')).map((t) => t.enabled), [false], 'muted stays muted');

  // The other camera: sent in place of the first, and it plays at Bob's.
  const [cameraBefore] = await sent(alice, 'video');
  const other = (await labels(camera)).find((l) => l !== cameraBefore.label);
  await camera.selectOption({ label: other });
  await eventually(async () => (await sent(alice, 'video')).every((t) => t.label === other && t.live), 5000, 'the other camera is sent');
  await waitForRemoteVideos(bob, 1);

  // A speaker: every remote tile plays there, a newcomer's too.
  const speakerId = await speaker.locator('option', { hasText: 'Fake Audio Output 1' }).getAttribute('value');
  await speaker.selectOption({ label: 'Fake Audio Output 1' });
  await dialog.getByRole('button', { name: 'Done' }).click();
  await dialog.waitFor({ state: 'hidden' });
  assert.equal(await alice.evaluate(() => document.activeElement.id), 'devices-btn', 'focus goes back to the button');
  const sinks = () => alice.evaluate(() => [...document.querySelectorAll('.tile:not(.local) video')].map((v) => v.sinkId));
  await eventually(async () => (await sinks()).every((s) => s === speakerId), 5000, 'Bob plays on the chosen speaker');
  const carol = await joinCall(browser, server.url, room, 'Carol');
  await waitForRemoteVideos(alice, 2);
  assert.deepEqual(await sinks(), [speakerId, speakerId], 'the newcomer plays there too');

  // No renegotiation for any of it.
  assert.deepEqual(await alice.evaluate(() => [...window.__callisto.links.values()].map((l) => l.pc.signalingState)), ['stable', 'stable']);
  for (const p of [alice, bob, carol]) await p.context().close();
});
