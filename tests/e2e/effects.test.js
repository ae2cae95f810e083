// Video effects, in real headless Chromium: what the others receive is read
// back from the video element's pixels at their end. Chromium's fake
// camera draws a colourful, sharp picture (a green field, a pacman, a
// frame counter), so black and white shows as colour gone, and a blur as
// edges gone.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { ARTIFACTS, serverAndBrowser, joinCall, waitForRemoteVideos, eventually, descriptions, videoFlows, cameraFrames, openRoom } from './lib.js';

let server;
let browser;
serverAndBrowser(
  { browserOptions: { extraArgs: ['--use-fake-device-for-media-stream=device-count=3'] } },
  (s, b) => { server = s; browser = b; },
);

/**
 * The colour and sharpness of the picture in a tile of `page` (the tile
 * of `peerId`, or the local one; or `#preview`, the pre-join screen's
 * preview): the mean distance of each pixel's
 * channels from their average, their mean (a black picture has none), and how many of each thousand pixels
 * differ sharply from their right neighbour, on a 320×180 copy.
 */
const picture = (page, peerId = null) => page.evaluate((peerId) => {
  const tile = peerId ? `.tile[data-peer-id="${CSS.escape(peerId)}"]` : '.tile.local';
  const video = document.querySelector(peerId === '#preview' ? peerId : `${tile} video`);
  const canvas = new OffscreenCanvas(320, 180);
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(video, 0, 0, 320, 180);
  const { data } = ctx.getImageData(0, 0, 320, 180);
  let colour = 0;
  let light = 0;
  let edges = 0;
  for (let i = 0; i < data.length; i += 4) {
    const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
    const mean = (r + g + b) / 3;
    light += mean;
    colour += Math.abs(r - mean) + Math.abs(g - mean) + Math.abs(b - mean);
    // A sharp edge: a step between neighbours that a blur spreads out.
    if ((i / 4) % 320 !== 319 && Math.abs(g - data[i + 5]) > 24) edges += 1;
  }
  const pixels = data.length / 4;
  return { colour: colour / pixels, light: light / pixels, edges: (1000 * edges) / pixels };
}, peerId);

/** Whether a picture is black and white, and not simply black. */
const grey = (p) => p.colour < 4 && p.light > 30;

/** The camera track each of the page's connections sends: its label (a camera's, or an effect's id) and state. */
const sentCamera = (page) => page.evaluate(() => [...window.__callisto.links.values()].map((l) => {
  const track = l.pc.getTransceivers().find((t) => t.receiver.track.kind === 'video')?.sender.track;
  return track && { label: track.label, live: track.readyState === 'live', enabled: track.enabled };
}));

/** For the record, not a pass mark: frames/s `page` decodes of its first peer's camera, over 3 s. */
async function decodedFps(page) {
  const [first] = await cameraFrames(page);
  await page.waitForTimeout(3000);
  const [later] = await cameraFrames(page);
  return Math.round((later - first) / 3);
}

test('a video effect is sent at once with no renegotiation, survives a camera switch and a reload, and None sends the camera again', async () => {
  const room = `effects-${Date.now()}`;
  let alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  await waitForRemoteVideos(bob, 1);
  let aliceId = await alice.evaluate(() => window.__callisto.id);
  const plain = await picture(bob, aliceId);
  const plainFps = await decodedFps(bob);
  assert.ok(plain.colour > 20 && plain.edges > 5, `the fake camera's picture is colourful and sharp: ${JSON.stringify(plain)}`);

  // Black and white, chosen by keyboard in the Devices dialog.
  const offersBefore = await descriptions(bob);
  await alice.getByRole('button', { name: 'Devices' }).click();
  const dialog = alice.getByRole('dialog', { name: 'Devices' });
  const effect = dialog.getByLabel('Video effect');
  assert.deepEqual(await effect.locator('option').allTextContents(), ['None', 'Blur everything', 'Brighten (low light)', 'Black and white']);
  assert.equal(await effect.inputValue(), 'none');
  await effect.focus();
  await alice.keyboard.press('End');
  assert.equal(await effect.inputValue(), 'mono');
  await eventually(async () => grey(await picture(bob, aliceId)), 10000, 'Bob sees Alice in black and white');
  assert.ok(grey(await picture(alice)), 'Alice\'s own tile shows what she sends');
  const [withEffect] = await sentCamera(alice);
  assert.ok(withEffect.live && !/^fake_device_/.test(withEffect.label), `an effect's track is sent, not the camera's: ${JSON.stringify(withEffect)}`);

  // Blur: the edges go, the colour comes back. Only the worker is told.
  await effect.selectOption('blur');
  await eventually(async () => {
    const p = await picture(bob, aliceId);
    return p.colour > plain.colour / 2 && p.edges < plain.edges / 3;
  }, 10000, `Bob sees Alice blurred (sharp: ${JSON.stringify(plain)}, now: ${JSON.stringify(await picture(bob, aliceId))})`);
  console.log(`# report: Bob decodes ${await decodedFps(bob)} frames/s of Alice's camera with the blur, ${plainFps} without an effect`);
  const shot = path.join(ARTIFACTS, 'effects-blur.png');
  await bob.screenshot({ path: shot });
  console.log(`# artifact: ${shot}`);

  // Another camera: still blurred, and the first camera is let go.
  await alice.evaluate(() => {
    const [link] = window.__callisto.links.values();
    window.__firstCamera = window.__callisto.cameraOf(link.pc.getSenders().find((s) => s.track?.kind === 'video').track);
  });
  await dialog.getByLabel('Camera').selectOption({ label: 'fake_device_2' });
  await eventually(async () => alice.evaluate(() => window.__firstCamera.readyState === 'ended'), 5000, 'the first camera is let go');
  await alice.waitForTimeout(1000);
  await eventually(async () => (await picture(bob, aliceId)).edges < plain.edges / 3, 10000, 'still blurred with the other camera');
  assert.equal(await dialog.getByLabel('Camera').inputValue(), await alice.evaluate(() => {
    const [link] = window.__callisto.links.values();
    return window.__callisto.cameraOf(link.pc.getSenders().find((s) => s.track?.kind === 'video').track).getSettings().deviceId;
  }), 'the dialog names the camera behind the effect');

  // Camera off turns the camera behind the effect off too.
  await alice.keyboard.press('Escape');
  await alice.getByRole('button', { name: 'Camera off' }).click();
  assert.deepEqual(await alice.evaluate(() => {
    const [link] = window.__callisto.links.values();
    const sent = link.pc.getSenders().find((s) => s.track?.kind === 'video').track;
    return [sent.enabled, window.__callisto.cameraOf(sent).enabled];
  }), [false, false]);
  await alice.getByRole('button', { name: 'Camera on' }).click();
  assert.equal(await descriptions(bob), offersBefore, 'no renegotiation for any of it');

  // A reload keeps the effect: Bob gets it again without Alice choosing it.
  const profile = alice.context();
  await alice.close();
  alice = await joinCall(browser, server.url, room, 'Alice', { context: profile });
  aliceId = await alice.evaluate(() => window.__callisto.id);
  await waitForRemoteVideos(bob, 1);
  await eventually(async () => (await picture(bob, aliceId)).edges < plain.edges / 3, 10000, 'blurred again after the reload');

  // None: the camera itself is sent again, and it keeps running.
  await alice.getByRole('button', { name: 'Devices' }).click();
  const kept = alice.getByRole('dialog', { name: 'Devices' }).getByLabel('Video effect');
  assert.equal(await kept.inputValue(), 'blur', 'the dialog shows the effect kept');
  await kept.selectOption('none');
  await eventually(async () => (await picture(bob, aliceId)).edges > plain.edges / 2, 10000, 'sharp again');
  const [camera] = await sentCamera(alice);
  assert.match(camera.label, /^fake_device_/, 'the camera itself is sent');
  assert.ok(camera.live, 'the camera keeps running');
  await videoFlows(bob, 'Bob');
  for (const p of [alice, bob]) await p.context().close();
});

test('the camera and the effect chosen before joining show in the preview and are what the call starts with', async () => {
  const room = `effects-prejoin-${Date.now()}`;
  const bob = await joinCall(browser, server.url, room, 'Bob');
  const context = await browser.newContext({ viewport: { width: 1280, height: 720 } });
  const alice = await context.newPage();
  await openRoom(alice, `${server.url}/r/${room}`, 'Alice');
  await eventually(async () => (await picture(alice, '#preview')).colour > 20, 10000, 'the preview shows the camera in colour');

  const open = alice.getByRole('button', { name: 'Devices and effects' });
  await open.click();
  const dialog = alice.getByRole('dialog', { name: 'Devices' });
  await dialog.getByLabel('Camera').selectOption({ label: 'fake_device_2' });
  await dialog.getByLabel('Video effect').selectOption({ label: 'Black and white' });
  await eventually(async () => grey(await picture(alice, '#preview')), 10000, 'the preview shows the effect');
  const shot = path.join(ARTIFACTS, 'prejoin-devices.png');
  await alice.screenshot({ path: shot });
  console.log(`# artifact: ${shot}`);
  await dialog.getByRole('button', { name: 'Done' }).click();
  assert.equal(await alice.evaluate(() => document.activeElement.id), 'prejoin-devices-btn', 'focus goes back to the button');

  await alice.getByLabel('Name', { exact: true }).fill('Alice');
  await alice.getByRole('button', { name: 'Join', exact: true }).click();
  await alice.getByRole('button', { name: 'Leave' }).waitFor({ timeout: 10000 });
  const aliceId = await alice.evaluate(() => window.__callisto.id);
  await waitForRemoteVideos(bob, 1);
  assert.ok(grey(await picture(bob, aliceId)), 'Bob sees the effect from the start');
  assert.equal(await alice.evaluate(() => {
    const [link] = window.__callisto.links.values();
    return window.__callisto.cameraOf(link.pc.getSenders().find((s) => s.track?.kind === 'video').track).label;
  }), 'fake_device_2', 'the camera chosen is the one sent');
  assert.equal(await alice.evaluate(() => document.getElementById('preview').srcObject === null), true, 'the hidden preview lets go of the stream');
  for (const p of [alice, bob]) await p.context().close();
});
