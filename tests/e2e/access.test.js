// A server with access codes (--access-codes-file): the app asks for one,
// says when it is wrong, joins with the right one, and remembers it.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { serverAndBrowser, waitForRemoteVideos } from './lib.js';

const CODE = 'moon-over-the-harbor-7214';
const codes = path.join(mkdtempSync(path.join(tmpdir(), 'callisto-e2e-access-')), 'codes');
writeFileSync(codes, `# the team's\n${CODE}\n`, { mode: 0o600 });

let server;
let browser;
serverAndBrowser({ serverArgs: ['--access-codes-file', codes] }, (s, b) => { server = s; browser = b; });

test('the app asks for the access code, says when it is wrong, and remembers the right one', async () => {
  const room = `access-${Date.now()}`;
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('pageerror', (err) => console.error('page error:', err.message));
  await page.goto(`${server.url}/r/${room}`);
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
  await bob.goto(`${server.url}/r/${room}`);
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
  await page.goto(`${server.url}/r/access-none-${Date.now()}`);
  await page.getByLabel('Name', { exact: true }).fill('Eve');
  await page.getByRole('button', { name: 'Join', exact: true }).click();
  await page.getByText('This server needs an access code to join.').waitFor({ timeout: 10000 });
  assert.ok(frames.some((f) => f.includes('"access-denied"')), frames.join('\n'));
  assert.ok(!frames.some((f) => f.includes('"welcome"') || f.includes('iceServers')), frames.join('\n'));
  await context.close();
});
