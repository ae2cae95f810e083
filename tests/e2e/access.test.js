// A server with access codes (--access-codes-file): the app asks for one,
// says when it is wrong, joins with the right one, and remembers it.

import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { serverAndBrowser, waitForRemoteVideos, cuttableProxy, eventually, openRoom } from './lib.js';

const CODE = 'moon-over-the-harbor-7214';
const dir = mkdtempSync(path.join(tmpdir(), 'callisto-e2e-access-'));
const codes = path.join(dir, 'codes');
writeFileSync(codes, `# the team's\n${CODE}\n`, { mode: 0o600 });
after(() => rmSync(dir, { recursive: true, force: true }));

let server;
let browser;
serverAndBrowser({ serverArgs: ['--access-codes-file', codes] }, (s, b) => { server = s; browser = b; });

test('the app asks for the access code, says when it is wrong, and remembers the right one', async () => {
  const room = `access-${Date.now()}`;
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('pageerror', (err) => console.error('page error:', err.message));
  await openRoom(page, `${server.url}/r/${room}`, 'Alice');
  const code = page.getByLabel('Access code');
  assert.equal(await code.isVisible(), false, 'not asked for before the server says so');
  await page.getByLabel('Name', { exact: true }).fill('Alice');
  const join = page.getByRole('button', { name: 'Join', exact: true });
  await join.click();

  const error = page.locator('#join-error');
  await page.getByText('This server needs an access code to join.').waitFor({ timeout: 10000 });
  assert.equal(await error.getAttribute('role'), 'alert');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'access-input', 'the field has the focus');
  assert.equal(await code.getAttribute('type'), 'password');

  await code.fill('moon-over-the-harbour-7214');
  await code.press('Enter');
  await page.getByText('That access code is not right.').waitFor({ timeout: 10000 });
  assert.equal(await page.locator('#call').isVisible(), false);

  await code.fill(CODE);
  await join.click();
  await page.getByRole('button', { name: 'Leave' }).waitFor({ timeout: 10000 });

  // The next page of this browser joins without being asked.
  const bob = await context.newPage();
  await openRoom(bob, `${server.url}/r/${room}`, 'Bob');
  await bob.getByLabel('Name', { exact: true }).fill('Bob');
  await bob.getByRole('button', { name: 'Join', exact: true }).click();
  await bob.getByRole('button', { name: 'Leave' }).waitFor({ timeout: 10000 });
  assert.equal(await bob.getByLabel('Access code').isVisible(), false);
  await waitForRemoteVideos(page, 1);
  await waitForRemoteVideos(bob, 1);

  // The code is not logged, and each refusal is, with its reason.
  const logs = server.logs.join('\n');
  assert.ok(!logs.includes('harbo'), 'no access code in the log');
  assert.match(logs, /join refused: no access code/);
  assert.match(logs, /join refused: not an access code of this server/);
  await context.close();
});

test('a browser without the code gets no welcome, and so no TURN credentials', async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  const frames = [];
  page.on('websocket', (ws) => ws.on('framereceived', ({ payload }) => frames.push(String(payload))));
  await openRoom(page, `${server.url}/r/access-none-${Date.now()}`, 'Eve');
  await page.getByLabel('Name', { exact: true }).fill('Eve');
  await page.getByRole('button', { name: 'Join', exact: true }).click();
  await page.getByText('This server needs an access code to join.').waitFor({ timeout: 10000 });
  assert.ok(frames.some((f) => f.includes('"access-denied"')), frames.join('\n'));
  assert.ok(!frames.some((f) => f.includes('"welcome"') || f.includes('iceServers')), frames.join('\n'));
  await context.close();
});

test('a page whose code was revoked stays in its call until its connection drops, then leaves, told why', async () => {
  const room = `access-revoked-${Date.now()}`;
  const proxy = await cuttableProxy(server.url);
  const context = await browser.newContext();
  await context.addInitScript((code) => localStorage.setItem('callisto.access', code), CODE);
  const page = await context.newPage();
  await openRoom(page, `${proxy.url}/r/${room}`, 'Alice');
  await page.getByLabel('Name', { exact: true }).fill('Alice');
  await page.getByRole('button', { name: 'Join', exact: true }).click();
  await page.getByRole('button', { name: 'Leave' }).waitFor({ timeout: 10000 });

  // The code is revoked (a new file, and SIGHUP): Alice stays for now.
  writeFileSync(codes, 'another-code-of-the-team-9921\n');
  const seen = server.logs.length;
  server.signal('SIGHUP');
  await eventually(async () => server.logs.slice(seen).some((l) => l.includes('access codes replaced')), 5000, 'the codes are read again');
  assert.equal(await page.locator('#call').isVisible(), true);

  // Her connection drops: taking her place back needs a code, and hers no
  // longer opens.
  proxy.cut();
  await page.getByText('The server no longer takes your access code.').waitFor({ timeout: 15000 });
  assert.equal(await page.locator('#left').isVisible(), true);
  assert.equal(await page.evaluate(() => localStorage.getItem('callisto.access')), null, 'the code is forgotten');
  await context.close();
  await proxy.close();
});
