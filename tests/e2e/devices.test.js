// Choosing the microphone, camera and speaker during a call, in real
// headless Chromium with its fake devices: three microphones, three
// cameras (asked for with device-count) and three speakers.
//
// Chromium's fake cameras differ in format: fake_device_0 gives I420,
// fake_device_1 Y16 (a depth camera's: a video element shows it, WebRTC
// does not send it) and fake_device_2 MJPEG. The tests send 0 and 2.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { ARTIFACTS, serverAndBrowser, joinCall, waitForRemoteVideos, playingRemotes, connectionReport, eventually, descriptions, videoFlows } from './lib.js';

let server;
let browser;
serverAndBrowser(
  { browserOptions: { extraArgs: ['--use-fake-device-for-media-stream=device-count=3'] } },
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
  assert.equal((await labels(camera)).length, 3, `cameras: ${await labels(camera)}`);
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
  const other = 'fake_device_2';
  assert.notEqual(cameraBefore.label, other);
  await camera.selectOption({ label: other });
  await eventually(async () => (await sent(alice, 'video')).every((t) => t.label === other && t.live), 5000, 'the other camera is sent');
  await videoFlows(bob, 'Bob');

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


test('a call joined without camera and microphone starts them later, sent to everyone with no renegotiation', async () => {
  const room = `devices-later-${Date.now()}`;
  // Alice offers to Bob and answers Carol (newcomers offer), so both
  // kinds of connection are covered.
  const bob = await joinCall(browser, server.url, room, 'Bob');
  const alice = await joinCall(browser, server.url, room, 'Alice', { noCamera: true });
  const carol = await joinCall(browser, server.url, room, 'Carol');
  await alice.getByText(/receive-only/).waitFor();
  const aliceId = await alice.evaluate(() => window.__callisto.id);
  for (const page of [bob, carol]) {
    await eventually(async () => (await playingRemotes(page)).length === 1, 20000, 'the other host\'s video');
    await page.locator(`.tile[data-peer-id="${aliceId}"].camera-off`).waitFor({ timeout: 10000 });
  }
  const cameraOn = alice.getByRole('button', { name: 'Camera on' });
  const unmute = alice.getByRole('button', { name: 'Unmute' });
  assert.equal(await cameraOn.getAttribute('aria-pressed'), 'true');
  assert.equal(await unmute.getAttribute('aria-pressed'), 'true');
  assert.deepEqual(await sent(alice, 'video'), [null, null]);

  // Still refused: the button says why, and nothing changes.
  await cameraOn.click();
  await alice.locator('#call-notice', { hasText: /permission was denied/ }).waitFor({ timeout: 5000 });
  assert.deepEqual(await sent(alice, 'video'), [null, null]);

  // Allowed now (in the site settings): the camera starts and is sent.
  const before = await Promise.all([alice, bob, carol].map(descriptions));
  await alice.evaluate(() => window.__allowMedia());
  await cameraOn.click();
  await alice.getByRole('button', { name: 'Camera off' }).waitFor({ timeout: 5000 });
  await eventually(async () => (await sent(alice, 'video')).every((t) => t?.live && t.enabled), 5000, 'Alice sends her camera');
  for (const page of [bob, carol]) {
    await eventually(async () => (await playingRemotes(page)).includes(aliceId), 15000, 'Alice\'s camera plays');
    await page.locator(`.tile[data-peer-id="${aliceId}"]:not(.camera-off)`).waitFor({ timeout: 5000 });
  }
  await videoFlows(bob, 'Bob');
  await videoFlows(carol, 'Carol');
  await alice.locator('.tile.local:not(.camera-off)').waitFor();
  assert.ok(!(await alice.getByText(/receive-only/).isVisible()), 'the receive-only notice is gone');

  // The microphone, too: Bob and Carol hear Alice (and each other).
  await unmute.click();
  await alice.getByRole('button', { name: 'Mute' }).waitFor({ timeout: 5000 });
  await eventually(async () => (await sent(alice, 'audio')).every((t) => t?.live && t.enabled), 5000, 'Alice sends her microphone');
  await audioFlows(bob, 'Bob');
  await audioFlows(carol, 'Carol');
  await bob.locator(`.tile[data-peer-id="${aliceId}"] .badge.muted`).waitFor({ state: 'hidden', timeout: 5000 });
  assert.deepEqual(await Promise.all([alice, bob, carol].map(descriptions)), before, 'no offer or answer went for any of it');

  // Muting now mutes what was started.
  await alice.getByRole('button', { name: 'Mute' }).click();
  assert.deepEqual((await sent(alice, 'audio')).map((t) => t.enabled), [false, false]);

  // A newcomer gets Alice's camera from the start.
  const dave = await joinCall(browser, server.url, room, 'Dave');
  await waitForRemoteVideos(dave, 3);
  for (const p of [alice, bob, carol, dave]) await p.context().close();
});

test('the devices dialog starts a microphone or camera in a call joined without', async () => {
  const room = `devices-dialog-${Date.now()}`;
  const bob = await joinCall(browser, server.url, room, 'Bob');
  const alice = await joinCall(browser, server.url, room, 'Alice', { noCamera: true });
  await alice.getByText(/receive-only/).waitFor();
  await alice.evaluate(() => window.__allowMedia());
  await alice.getByRole('button', { name: 'Devices' }).click();
  const dialog = alice.getByRole('dialog', { name: 'Devices' });
  const camera = dialog.getByLabel('Camera');
  // The browser names its devices once capture was allowed: here the
  // fake devices are, as after a first capture in a real browser.
  assert.equal(await camera.inputValue(), '', '"None in use" is chosen');
  const labels = await camera.locator('option').allTextContents();
  assert.equal(labels[0], 'None in use');
  await camera.selectOption({ label: 'fake_device_2' });
  await eventually(async () => (await sent(alice, 'video')).every((t) => t?.label === 'fake_device_2' && t.live), 5000, 'the chosen camera is sent');
  await waitForRemoteVideos(bob, 1);
  await videoFlows(bob, 'Bob');
  assert.equal(await camera.inputValue(), await camera.locator('option', { hasText: 'fake_device_2' }).getAttribute('value'));
  await dialog.getByRole('button', { name: 'Done' }).click();
  assert.equal(await alice.getByRole('button', { name: 'Camera off' }).getAttribute('aria-pressed'), 'false');
  // The microphone's button still starts one; nothing was done to it.
  assert.deepEqual(await sent(alice, 'audio'), [null]);
  for (const p of [alice, bob]) await p.context().close();
});

/** The processing of the microphone each of the page's connections sends. */
const processing = (page) => page.evaluate(() => [...window.__callisto.links.values()].map((l) => {
  const track = l.pc.getTransceivers().find((t) => t.receiver.track.kind === 'audio')?.sender.track;
  const s = track?.getSettings() ?? {};
  return track && { echoCancellation: s.echoCancellation, noiseSuppression: s.noiseSuppression, autoGainControl: s.autoGainControl, live: track.readyState === 'live' };
}));

test('echo cancellation, noise suppression and automatic gain are chosen in the call and kept for the next', async () => {
  const room = `devices-processing-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  await waitForRemoteVideos(alice, 1);
  const all = { echoCancellation: true, noiseSuppression: true, autoGainControl: true, live: true };
  assert.deepEqual(await processing(alice), [all], 'all on by default');

  await alice.getByRole('button', { name: 'Devices' }).click();
  const dialog = alice.getByRole('dialog', { name: 'Devices' });
  const group = dialog.getByRole('group', { name: 'Microphone processing' });
  const echo = group.getByRole('checkbox', { name: 'Echo cancellation' });
  const noise = group.getByRole('checkbox', { name: 'Noise suppression' });
  const gain = group.getByRole('checkbox', { name: 'Automatic gain' });
  for (const box of [echo, noise, gain]) assert.equal(await box.isChecked(), true);
  const before = await Promise.all([alice, bob].map(descriptions));
  await alice.evaluate(() => {
    const [link] = window.__callisto.links.values();
    window.__oldMic = link.pc.getSenders().find((s) => s.track?.kind === 'audio').track;
  });

  // Echo cancellation and noise suppression off, by keyboard: the
  // microphone is opened again without them, and still heard.
  await echo.focus();
  await alice.keyboard.press('Space');
  await eventually(async () => (await processing(alice))[0]?.echoCancellation === false, 5000, 'echo cancellation off');
  await noise.focus();
  await alice.keyboard.press('Space');
  const some = { echoCancellation: false, noiseSuppression: false, autoGainControl: true, live: true };
  await eventually(async () => JSON.stringify(await processing(alice)) === JSON.stringify([some]), 5000, 'noise suppression off too');
  await audioFlows(bob, 'Bob');
  assert.deepEqual(await Promise.all([alice, bob].map(descriptions)), before, 'no renegotiation');
  assert.equal(await alice.evaluate(() => window.__oldMic.readyState), 'ended', 'the old microphone is let go');

  // The next call in this browser starts with the same choice.
  await alice.reload();
  await alice.getByLabel('Name', { exact: true }).waitFor();
  await eventually(() => alice.evaluate(() => Boolean(document.getElementById('preview').srcObject)), 5000, 'the preview');
  const next = await alice.evaluate(() => {
    const s = document.getElementById('preview').srcObject.getAudioTracks()[0].getSettings();
    return { echoCancellation: s.echoCancellation, noiseSuppression: s.noiseSuppression, autoGainControl: s.autoGainControl };
  });
  assert.deepEqual(next, { echoCancellation: false, noiseSuppression: false, autoGainControl: true });
  for (const p of [alice, bob]) await p.context().close();
});
