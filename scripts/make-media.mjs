// Makes the native peer's media (crates/peer/media/): a 2 s test pattern
// in VP8 and a 1 s 440 Hz tone in Opus, each an IVF file of encoded
// frames that `callisto peer --send-media` loops. Encoded once, here, by
// Chromium's own encoders (WebCodecs), so the peer needs no codec
// library and sends what browsers decode. Run from the repository root
// after the e2e tests' npm install:
//
//   node scripts/make-media.mjs
//
// The files are committed; run this again only to change them.

import { writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createRequire } from 'node:module';

const require = createRequire(new URL('../tests/e2e/package.json', import.meta.url));
const { chromium } = require('playwright-core');

const FPS = 15;
const VIDEO_FRAMES = 2 * FPS;

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', args: ['--no-sandbox'] });
const page = await browser.newPage();
// WebCodecs needs a secure context: a page from loopback is one.
const server = createServer((_, res) => res.end('<!doctype html><title>media</title>'));
await new Promise((r) => server.listen(0, '127.0.0.1', r));
await page.goto(`http://127.0.0.1:${server.address().port}/`);
const { video, audio } = await page.evaluate(async ({ FPS, VIDEO_FRAMES }) => {
  const chunks = (list) => list.map((c) => {
    const data = new Uint8Array(c.byteLength);
    c.copyTo(data);
    return { timestamp: c.timestamp, key: c.type === 'key', data: Array.from(data) };
  });

  // Video: moving bars, a sweeping hand and the frame's number, so that
  // a frozen picture shows.
  const canvas = new OffscreenCanvas(320, 240);
  const g = canvas.getContext('2d');
  const video = [];
  const encoder = new VideoEncoder({ output: (c) => video.push(c), error: (e) => { throw e; } });
  encoder.configure({ codec: 'vp8', width: 320, height: 240, bitrate: 300_000, framerate: FPS, latencyMode: 'realtime' });
  const colours = ['#c0c0c0', '#c0c000', '#00c0c0', '#00c000', '#c000c0', '#c00000', '#0000c0'];
  for (let i = 0; i < VIDEO_FRAMES; i++) {
    colours.forEach((c, k) => { g.fillStyle = c; g.fillRect(k * 320 / 7, 0, 320 / 7 + 1, 240); });
    const angle = (i / VIDEO_FRAMES) * 2 * Math.PI;
    g.strokeStyle = '#000'; g.lineWidth = 8;
    g.beginPath(); g.moveTo(160, 120); g.lineTo(160 + 90 * Math.sin(angle), 120 - 90 * Math.cos(angle)); g.stroke();
    g.fillStyle = '#000'; g.fillRect(0, 200, 320, 40);
    g.fillStyle = '#fff'; g.font = '20px sans-serif'; g.fillText(`callisto peer · ${String(i).padStart(2, '0')}`, 12, 228);
    const frame = new VideoFrame(canvas, { timestamp: Math.round(i * 1e6 / FPS), duration: Math.round(1e6 / FPS) });
    encoder.encode(frame, { keyFrame: i === 0 });
    frame.close();
  }
  await encoder.flush();

  // Audio: one second of 440 Hz (a whole number of cycles, so it loops
  // without a click), at a fifth of full scale.
  const rate = 48000;
  const samples = new Float32Array(rate);
  for (let n = 0; n < rate; n++) samples[n] = 0.2 * Math.sin(2 * Math.PI * 440 * n / rate);
  const audio = [];
  const aenc = new AudioEncoder({ output: (c) => audio.push(c), error: (e) => { throw e; } });
  aenc.configure({ codec: 'opus', sampleRate: rate, numberOfChannels: 1, bitrate: 32000 });
  aenc.encode(new AudioData({ format: 'f32-planar', sampleRate: rate, numberOfFrames: rate, numberOfChannels: 1, timestamp: 0, data: samples }));
  await aenc.flush();
  return { video: chunks(video), audio: chunks(audio) };
}, { FPS, VIDEO_FRAMES });
await browser.close();
server.close();

/**
 * An IVF file: a 32-byte header (fourcc, size, the time base as
 * rate/scale, the frame count), then per frame its size, its time in
 * the time base, and its bytes.
 */
function ivf(fourcc, width, height, rate, scale, frames) {
  const header = Buffer.alloc(32);
  header.write('DKIF', 0, 'ascii');
  header.writeUInt16LE(0, 4);
  header.writeUInt16LE(32, 6);
  header.write(fourcc, 8, 'ascii');
  header.writeUInt16LE(width, 12);
  header.writeUInt16LE(height, 14);
  header.writeUInt32LE(rate, 16);
  header.writeUInt32LE(scale, 20);
  header.writeUInt32LE(frames.length, 24);
  const parts = [header];
  for (const { pts, data } of frames) {
    const h = Buffer.alloc(12);
    h.writeUInt32LE(data.length, 0);
    h.writeBigUInt64LE(BigInt(pts), 4);
    parts.push(h, Buffer.from(data));
  }
  return Buffer.concat(parts);
}

if (!video[0]?.key) throw new Error('the first video frame is not a key frame');
// Time bases: the frame rate for video (pts = frame number), samples for audio.
writeFileSync('crates/peer/media/pattern.ivf', ivf('VP80', 320, 240, FPS, 1, video.map((c, i) => ({ pts: i, data: c.data }))));
writeFileSync('crates/peer/media/tone.ivf', ivf('OPUS', 0, 0, 48000, 1, audio.map((c) => ({ pts: Math.round(c.timestamp * 48000 / 1e6), data: c.data }))));
console.log(`video: ${video.length} frames, ${video.reduce((n, c) => n + c.data.length, 0)} bytes; audio: ${audio.length} frames, ${audio.reduce((n, c) => n + c.data.length, 0)} bytes`);
