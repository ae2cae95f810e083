// A big file between two real headless Chromium pages: the receiver keeps
// it on disk as it comes (received.js), so it may be larger than a page
// could hold in memory. Its own file: at about 10 MiB/s here, it takes a
// minute of the 5 a test file may take.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createReadStream } from 'node:fs';
import { serverAndBrowser, joinCall, eventually, channelsOpen } from './lib.js';

let server;
let browser;
serverAndBrowser({}, (s, b) => { server = s; browser = b; });

const chatButton = (page, name) => page.getByRole('button', { name, exact: true });

/**
 * The folders and files under the origin's `received/` (received.js), with
 * their sizes; null if one went while they were read (a page starting
 * removes those of pages that closed): ask again.
 */
const receivedOnDisk = (page) => page.evaluate(async () => {
  const root = await navigator.storage.getDirectory();
  const all = await root.getDirectoryHandle('received', { create: true });
  const found = {};
  try {
    for await (const [folder, handle] of all.entries()) {
      found[folder] = [];
      for await (const file of handle.values()) found[folder].push((await file.getFile()).size);
    }
  } catch (err) {
    if (err.name === 'NotFoundError') return null;
    throw err;
  }
  return found;
});

test('a file larger than a page could hold goes whole, kept on disk as it comes; closed pages\' files are removed', async () => {
  const room = `big-file-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  await channelsOpen([alice, bob]);
  assert.deepEqual(await receivedOnDisk(bob), {}, 'nothing kept before');

  // Over the 512 MiB the app could once receive (in memory): a pattern of
  // bytes, checked one by one once saved. Alice's page writes it to its
  // own storage first, then picks it as the file input would; nothing
  // holds it all in memory.
  const size = 520 * 1024 * 1024 + 12345;
  const byteAt = (i) => ((i * 7) ^ (i >>> 13)) & 0xff;
  await chatButton(alice, 'Chat').click();
  await alice.evaluate(async ({ size, byteAt }) => {
    const at = new Function(`return ${byteAt}`)();
    const root = await navigator.storage.getDirectory();
    const handle = await root.getFileHandle('big.bin', { create: true });
    const out = await handle.createWritable();
    const block = new Uint8Array(4 * 1024 * 1024);
    for (let offset = 0; offset < size; offset += block.length) {
      const n = Math.min(block.length, size - offset);
      for (let i = 0; i < n; i++) block[i] = at(offset + i);
      await out.write(block.subarray(0, n));
    }
    await out.close();
    const picked = new DataTransfer();
    picked.items.add(await handle.getFile());
    const input = document.getElementById('file-input');
    input.files = picked.files;
    input.dispatchEvent(new Event('change'));
  }, { size, byteAt: byteAt.toString() });
  await chatButton(bob, 'Chat (1 new)').click();
  await bob.getByRole('button', { name: 'Accept big.bin' }).click({ timeout: 10000 });
  const started = Date.now();
  const save = bob.getByRole('link', { name: 'Save big.bin' });
  await save.waitFor({ timeout: 200000 });
  const seconds = (Date.now() - started) / 1000;
  console.log(`# ${(size / 2 ** 20).toFixed(0)} MiB in ${seconds.toFixed(1)} s (${(size / 2 ** 20 / seconds).toFixed(0)} MiB/s)`);
  await alice.locator('.deliveries li', { hasText: 'Bob:' }).getByText('delivered').waitFor({ timeout: 5000 });

  // Kept on disk, in Bob's page's own folder, whole.
  const kept = await receivedOnDisk(bob);
  assert.deepEqual(Object.values(kept), [[size]], `one file of ${size} bytes on disk: ${JSON.stringify(kept)}`);
  // Saved as the person would save it, then checked byte by byte.
  const [download] = await Promise.all([bob.waitForEvent('download'), save.click()]);
  let offset = 0;
  let wrong = null;
  for await (const chunk of createReadStream(await download.path())) {
    for (let i = 0; i < chunk.length && wrong === null; i++) if (chunk[i] !== byteAt(offset + i)) wrong = offset + i;
    offset += chunk.length;
  }
  assert.deepEqual({ length: offset, wrong }, { length: size, wrong: null }, 'every byte as sent');
  await download.delete();

  // Another page of the same browser starts: Bob's page is still open, so
  // its file stays. Once Bob's page has closed, the next page to start
  // removes it.
  const context = bob.context();
  const other = await context.newPage();
  await other.goto(server.url);
  await other.waitForTimeout(1000);
  assert.deepEqual(await receivedOnDisk(other), kept, 'an open page\'s file is left alone');
  await bob.close();
  const next = await context.newPage();
  await next.goto(server.url);
  await eventually(async () => {
    const left = await receivedOnDisk(next);
    return left !== null && Object.keys(left).length === 0;
  }, 10000, 'a closed page\'s file is removed');
  for (const p of [alice, other]) await p.context().close();
});

test('a receiver without the space for a file says so, and the sender hears it failed', async () => {
  const room = `no-space-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  await channelsOpen([alice, bob]);
  // Bob's browser has 1 MB left for this site.
  await bob.evaluate(() => {
    navigator.storage.estimate = async () => ({ quota: 11 * 1024 * 1024, usage: 10 * 1024 * 1024 });
  });
  await chatButton(alice, 'Chat').click();
  await alice.locator('#file-input').setInputFiles({ name: 'two.bin', mimeType: 'application/octet-stream', buffer: Buffer.alloc(2 * 1024 * 1024, 7) });
  await chatButton(bob, 'Chat (1 new)').click();
  await bob.getByRole('button', { name: 'Accept two.bin' }).click({ timeout: 10000 });
  const entry = bob.locator('.message.file', { hasText: 'two.bin' });
  await entry.getByText("failed: not enough space in this browser's storage (1.0 MB free)").waitFor({ timeout: 10000 });
  await alice.locator('.deliveries li', { hasText: 'Bob:' }).getByText('failed: they could not keep it').waitFor({ timeout: 10000 });
  assert.equal(await bob.getByRole('link', { name: 'Save two.bin' }).count(), 0);
  assert.deepEqual(Object.values(await receivedOnDisk(bob)).flat(), [], 'nothing left on disk');
  for (const p of [alice, bob]) await p.context().close();
});
