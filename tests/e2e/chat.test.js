// Chat in a call, between real headless Chromium pages: peer to peer over
// data channels, never through the server.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { ARTIFACTS, startServer, launchBrowser, joinCall, waitForRemoteVideos, eventually } from './lib.js';

let server;
let browser;

before(async () => {
  server = await startServer();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  const code = await server?.stop();
  assert.equal(code, 0, 'the server exits cleanly on SIGTERM');
});

/** Types `text` into the chat's message box and presses Enter. */
async function write(page, text) {
  const input = page.getByRole('textbox', { name: 'Message' });
  await input.fill(text);
  await input.press('Enter');
}

const log = (page) => page.getByRole('log', { name: 'Messages' });
const lastMessage = (page) => log(page).locator('.message').last();
const chatButton = (page, name) => page.getByRole('button', { name, exact: true });

/** What a page's console warns of and which errors it throws, from now on. */
function watch(page) {
  const seen = { warnings: [], errors: [] };
  page.on('console', (msg) => { if (msg.type() === 'warning') seen.warnings.push(msg.text()); });
  page.on('pageerror', (err) => seen.errors.push(err.message));
  return seen;
}

test('chat reaches everyone in the call peer to peer, as text, by keyboard too', async () => {
  const room = `chat-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');

  // Alone, a message shows, and says nobody got it.
  await chatButton(alice, 'Chat').click();
  await write(alice, 'anyone?');
  await alice.getByText('Nobody else is here yet').waitFor({ timeout: 5000 });
  assert.equal(await lastMessage(alice).locator('.author').textContent(), 'Alice (you)');

  const bob = await joinCall(browser, server.url, room, 'Bob');
  await waitForRemoteVideos(alice, 1);
  await waitForRemoteVideos(bob, 1);

  // Markup is text. Bob's panel is closed: his Chat button counts the message.
  const hello = 'Hello <b>Bob</b> <img src=x onerror="window.__injected = 1"> 👋';
  await write(alice, hello);
  await chatButton(bob, 'Chat (1 new)').waitFor({ timeout: 5000 });
  await chatButton(bob, 'Chat (1 new)').click();
  assert.equal(await lastMessage(bob).locator('.author').textContent(), 'Alice');
  assert.equal(await lastMessage(bob).locator('.text').textContent(), hello);
  assert.equal(await log(bob).locator('b, img').count(), 0, 'no markup from a message reaches the page');
  assert.equal(await bob.evaluate(() => window.__injected ?? null), null);
  assert.equal(await log(bob).getByText('anyone?').count(), 0, 'nothing from before Bob came');
  await chatButton(bob, 'Chat').waitFor({ timeout: 1000 }); // read: the count is gone
  assert.equal(await chatButton(bob, 'Chat').getAttribute('aria-expanded'), 'true');

  // Bob answers with the keyboard alone: opening the panel put him in
  // the message box, Enter sends, Escape closes and goes back to the button.
  assert.equal(await bob.evaluate(() => document.activeElement.id), 'chat-input');
  await bob.keyboard.type('Hi Alice');
  await bob.keyboard.press('Enter');
  await log(alice).locator('.message', { hasText: 'Hi Alice' }).waitFor({ timeout: 5000 });
  assert.equal(await lastMessage(alice).locator('.author').textContent(), 'Bob');
  await bob.keyboard.press('Escape');
  assert.equal(await bob.locator('#chat').isVisible(), false, 'Escape closes the panel');
  assert.equal(await bob.evaluate(() => document.activeElement.id), 'chat-btn');

  // Carol joins, and Alice writes the moment her link to Carol exists,
  // before its channel is open: the message waits for it. Bob's channel
  // is open: he gets it at once.
  const written = alice.evaluate(() => new Promise((resolve) => {
    const poll = setInterval(() => {
      const link = [...window.__callisto.links.values()].find((l) => l.name === 'Carol');
      if (!link) return;
      clearInterval(poll);
      const state = link.chatChannel?.readyState ?? 'none yet';
      document.getElementById('chat-input').value = 'Welcome, Carol';
      document.getElementById('chat-form').requestSubmit();
      resolve(state);
    }, 2);
  }));
  const carol = await joinCall(browser, server.url, room, 'Carol');
  const stateWhenWritten = await written;
  assert.notEqual(stateWhenWritten, 'open', 'written before the channel to Carol opened');
  console.log(`# report: Alice's chat channel to Carol when she wrote: ${stateWhenWritten}`);
  for (const page of [bob, carol]) await chatButton(page, 'Chat (1 new)').waitFor({ timeout: 10000 });
  await chatButton(carol, 'Chat (1 new)').click();
  assert.equal(await lastMessage(carol).locator('.text').textContent(), 'Welcome, Carol');
  assert.equal(await log(carol).locator('.message').count(), 1, 'Carol sees what was written from when she came');
  assert.equal(await alice.getByText(/Not delivered/).count(), 0);

  const shot = path.join(ARTIFACTS, 'chat.png');
  await carol.screenshot({ path: shot });
  console.log(`# artifact: ${shot}`);

  // None of it went through the server.
  for (const page of [alice, bob, carol]) {
    const signaling = JSON.stringify(await page.evaluate(() => window.__received));
    for (const text of ['anyone?', 'Hello', 'Hi Alice', 'Welcome, Carol']) {
      assert.ok(!signaling.includes(text), `"${text}" is not in any signaling message`);
    }
  }
  assert.ok(!server.logs.some((l) => l.includes('Hi Alice')));

  for (const p of [alice, bob, carol]) await p.context().close();
});

test('what a peer sends on the chat channel that is not a message is ignored with a warning; a flood keeps the last 500', async () => {
  const room = `chat-bad-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  const bobId = await bob.evaluate(() => window.__callisto.id);
  await eventually(
    () => alice.evaluate((id) => window.__callisto.links.get(id)?.chatChannel?.readyState === 'open', bobId),
    15000, 'Alice\'s chat channel to Bob open');
  const seen = watch(bob);

  // Alice's page writes into the channel directly, as another program could.
  await alice.evaluate((id) => {
    const channel = window.__callisto.links.get(id).chatChannel;
    channel.send('not JSON');
    channel.send(new Uint8Array([1, 2, 3]));
    channel.send(JSON.stringify({ type: 'chat', text: 42 }));
    channel.send(JSON.stringify({ type: 'chat', text: '   ' }));
    channel.send(JSON.stringify({ type: 'file', name: 'x' }));
    channel.send(JSON.stringify({ type: 'chat', text: 'x'.repeat(4001) }));
    channel.send(JSON.stringify({ type: 'chat', text: 'still here' }));
  }, bobId);
  await chatButton(bob, 'Chat (1 new)').waitFor({ timeout: 5000 });
  await chatButton(bob, 'Chat (1 new)').click();
  assert.equal(await lastMessage(bob).locator('.text').textContent(), 'still here');
  assert.equal(await log(bob).locator('.message').count(), 1);
  const ignored = seen.warnings.filter((w) => w.includes('(Alice): ignored a chat message'));
  assert.equal(ignored.length, 6, `one warning for each bad message:\n${ignored.join('\n')}`);
  for (const why of ['not JSON', 'a binary message', 'no text', 'an unknown type "file"', 'longer than 4000']) {
    assert.ok(ignored.some((w) => w.includes(why)), `a warning says "${why}"`);
  }
  assert.deepEqual(seen.errors, []);

  // A peer that floods the chat cannot fill the page's memory: the log
  // keeps the last 500 messages.
  await alice.evaluate((id) => {
    const channel = window.__callisto.links.get(id).chatChannel;
    for (let i = 0; i < 600; i++) channel.send(JSON.stringify({ type: 'chat', text: `flood ${i}` }));
  }, bobId);
  await log(bob).locator('.message', { hasText: 'flood 599' }).waitFor({ timeout: 10000 });
  assert.equal(await log(bob).locator('li').count(), 500);
  assert.equal(await log(bob).locator('li').first().locator('.text').textContent(), 'flood 100');

  // A data channel this app does not use is closed, and the chat goes on.
  await alice.evaluate((id) => { window.__callisto.links.get(id).pc.createDataChannel('other'); }, bobId);
  await eventually(() => seen.warnings.some((w) => w.includes('closed a data channel this app does not use: "other"')), 5000, 'the warning');
  await chatButton(alice, 'Chat').click();
  await write(alice, 'after that');
  await log(bob).locator('.message', { hasText: 'after that' }).waitFor({ timeout: 5000 });
  assert.deepEqual(seen.errors, []);

  for (const p of [alice, bob]) await p.context().close();
});
