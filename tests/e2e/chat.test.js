// Chat and file transfer in a call, between real headless Chromium pages:
// peer to peer over data channels, never through the server.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { ARTIFACTS, serverAndBrowser, joinCall, waitForRemoteVideos, eventually, channelsOpen, pickRandomFile, writeChat as write } from './lib.js';

let server;
let browser;
serverAndBrowser({}, (s, b) => { server = s; browser = b; });

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
  await channelsOpen([alice, bob]);
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
    // Saying it moved while the server still lists it: no one else's id is taken.
    channel.send(JSON.stringify({ type: 'moved', id: 'someone-else' }));
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
  assert.ok(seen.warnings.some((w) => w.includes('says it moved to someone-else, but the server still lists it: ignored')), 'the false move is ignored');
  const aliceId = await alice.evaluate(() => window.__callisto.id);
  assert.deepEqual(await bob.evaluate(() => [...window.__callisto.links.keys()]), [aliceId], 'Alice\'s link keeps her id');

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

test('a web address in a message is a link that opens apart from the call; nothing else is', async () => {
  const room = `chat-links-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  await channelsOpen([alice, bob]);
  await chatButton(bob, 'Chat').click();
  await write(bob, 'notes at https://example.test/notes?day=1. Not javascript:alert(1) nor <b>this</b>');
  await chatButton(alice, 'Chat (1 new)').click();
  const message = lastMessage(alice).locator('.text');
  await message.waitFor({ timeout: 5000 });
  assert.equal(await message.textContent(), 'notes at https://example.test/notes?day=1. Not javascript:alert(1) nor <b>this</b>');
  const links = await message.locator('a').evaluateAll((as) => as.map((a) => ({ href: a.href, text: a.textContent, target: a.target, rel: a.rel })));
  assert.deepEqual(links, [{ href: 'https://example.test/notes?day=1', text: 'https://example.test/notes?day=1', target: '_blank', rel: 'noopener noreferrer' }]);
  assert.equal(await message.locator('b').count(), 0, 'markup stays text');
  // The link is reached by keyboard like any other (it is not followed:
  // tests reach no address outside this machine).
  assert.equal(await message.getByRole('link', { name: 'https://example.test/notes?day=1' }).count(), 1);
  for (const p of [alice, bob]) await p.context().close();
});

test('what comes in while the chat is closed is told to screen readers; a burst is counted, not read out', async () => {
  const room = `chat-announce-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  await channelsOpen([alice, bob]);
  const announced = () => bob.locator('#chat-announce').textContent();
  // A status region, which screen readers read, not shown on screen.
  assert.equal(await bob.locator('#chat-announce').getAttribute('role'), 'status');
  assert.equal(await bob.locator('#chat-announce').isVisible(), true, 'in the accessibility tree: not display:none');
  assert.deepEqual(await bob.locator('#chat-announce').boundingBox().then((b) => [b.width, b.height]), [1, 1], 'but not seen');

  await chatButton(alice, 'Chat').click();
  await write(alice, 'Are you there?');
  await eventually(async () => (await announced()) === 'Chat, Alice: Are you there?', 5000, 'the message is announced');

  // A burst: the first may be read, the rest are counted in one line.
  for (let i = 1; i <= 6; i++) await write(alice, `burst ${i}`);
  await eventually(async () => /^Chat, [2-6] new messages$/.test(await announced()), 5000, 'the burst is counted');
  assert.equal(await bob.locator('#chat-announce p').count(), 1, 'one line at a time');

  // A long message is cut short.
  await bob.waitForTimeout(2100);
  await write(alice, 'x'.repeat(1000));
  await eventually(async () => /^Chat, Alice: x+…$/.test(await announced()), 5000, 'the long message is announced');
  assert.equal([...(await announced())].length, 'Chat, Alice: '.length + 200);

  // A file offer too.
  await alice.locator('#file-input').setInputFiles({ name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('hi') });
  await eventually(async () => (await announced()) === 'Chat, Alice: offers a file, notes.txt', 5000, 'the file offer is announced');

  // Open, the log speaks for itself: nothing more here, not even Bob's own.
  await chatButton(bob, 'Chat (9 new)').click();
  assert.equal(await announced(), '');
  await write(alice, 'now it is open');
  await log(bob).getByText('now it is open').waitFor({ timeout: 5000 });
  await write(bob, 'I see it');
  await bob.waitForTimeout(500);
  assert.equal(await announced(), '');
  for (const p of [alice, bob]) await p.context().close();
});

const sha256 = (bytes) => createHash('sha256').update(bytes).digest('hex');

test('a file goes whole to whoever accepts it, peer to peer; declined and cancelled ones go nowhere', async () => {
  const room = `files-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  const carol = await joinCall(browser, server.url, room, 'Carol');
  await channelsOpen([alice, bob, carol]);

  // Random bytes: two blocks as the sender reads them and an odd tail.
  const name = 'notes <1>.bin';
  await chatButton(alice, 'Chat').click();
  const length = 1.5 * 1024 * 1024 + 123;
  const expected = { length, sha256: await pickRandomFile(alice, name, length) };
  const delivery = (who) => alice.locator('.deliveries li', { hasText: `${who}:` });
  await delivery('Bob').getByText('waiting for them to accept').waitFor({ timeout: 10000 });

  // Bob accepts, Carol declines; each saw only an offer until then.
  for (const page of [bob, carol]) {
    await chatButton(page, 'Chat (1 new)').click();
    await lastMessage(page).getByText(`${name} (1.5 MB)`).waitFor();
    assert.equal(await lastMessage(page).locator('.author').textContent(), 'Alice');
  }
  await bob.getByRole('button', { name: `Accept ${name}` }).click();
  await carol.getByRole('button', { name: `Decline ${name}` }).click();
  const save = bob.getByRole('link', { name: `Save ${name}` });
  await save.waitFor({ timeout: 15000 });
  const [download] = await Promise.all([bob.waitForEvent('download'), save.click()]);
  // Chromium saves it as notes _1_.bin: '<' and '>' are not for file names.
  assert.match(download.suggestedFilename(), /^notes .1.\.bin$/);
  const got = readFileSync(await download.path());
  assert.equal(got.length, expected.length);
  assert.equal(sha256(got), expected.sha256, 'the file arrived whole');
  await delivery('Bob').getByText('delivered').waitFor({ timeout: 5000 });
  await delivery('Carol').getByText('declined').waitFor({ timeout: 5000 });
  assert.equal(await carol.getByRole('link', { name: `Save ${name}` }).count(), 0);
  assert.equal(await alice.getByRole('button', { name: `Cancel sending ${name}` }).isVisible(), false, 'nothing left to cancel');
  for (const [who, page] of [['sender', alice], ['receiver', bob]]) {
    const shot = path.join(ARTIFACTS, `file-${who}.png`);
    await page.screenshot({ path: shot });
    console.log(`# artifact: ${shot}`);
  }

  // Alice cancels a file before anyone accepts it: the offer says so, and
  // can no longer be accepted.
  await alice.locator('#file-input').setInputFiles({ name: 'second.txt', mimeType: 'text/plain', buffer: Buffer.from('two') });
  await bob.getByRole('button', { name: 'Accept second.txt' }).waitFor({ timeout: 10000 });
  await alice.getByRole('button', { name: 'Cancel sending second.txt' }).click();
  await bob.locator('.message.file', { hasText: 'second.txt' }).getByText(/^stopped/).waitFor({ timeout: 5000 });
  assert.equal(await bob.getByRole('button', { name: 'Accept second.txt' }).isVisible(), false);
  await delivery('Bob').filter({ hasText: 'cancelled' }).waitFor();

  // Neither file's name nor bytes went through the server.
  for (const page of [alice, bob, carol]) {
    const signaling = JSON.stringify(await page.evaluate(() => window.__received));
    assert.ok(!signaling.includes('notes <1>') && !signaling.includes('second.txt'), 'no file in any signaling message');
  }
  for (const p of [alice, bob, carol]) await p.context().close();
});

test('what a peer sends on a file channel out of turn ends that transfer with a warning; it cannot pile up channels', async () => {
  const room = `files-bad-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  const bobId = await bob.evaluate(() => window.__callisto.id);
  await channelsOpen([alice, bob]);
  const seen = watch(bob);
  // Alice's page opens file channels to Bob itself, as another program could.
  await alice.evaluate((id) => {
    const link = window.__callisto.links.get(id);
    window.__open = (first) => new Promise((resolve) => {
      const channel = link.pc.createDataChannel('file', { protocol: 'callisto.file.v1' });
      channel.binaryType = 'arraybuffer';
      window.__closed = window.__closed ?? [];
      channel.onclose = () => {
        window.__closed.push(first ?? 'silent');
        resolve(channel); // Bob may close it before it opens here
      };
      channel.onopen = () => {
        if (first) channel.send(first);
        resolve(channel);
      };
    });
  }, bobId);

  // More bytes than offered, under a name with folders and a NUL in it.
  await alice.evaluate(async () => {
    const channel = await window.__open(JSON.stringify({ type: 'offer', name: '../../evil\u0000.sh', size: 10 }));
    channel.onmessage = () => channel.send(new Uint8Array(20)); // the accept
  });
  await chatButton(bob, 'Chat (1 new)').click();
  const entry = lastMessage(bob);
  await entry.getByText('__.._evil_.sh (10 B)').waitFor({ timeout: 5000 });
  await bob.getByRole('button', { name: 'Accept __.._evil_.sh' }).click();
  await entry.getByText('failed: it sent more than the 10 bytes offered').waitFor({ timeout: 5000 });
  assert.equal(await bob.getByRole('link', { name: /^Save/ }).count(), 0);

  // An offer over the size limit, and one that is not JSON: closed, with a
  // warning, and no entry in the chat.
  await alice.evaluate(() => window.__open(JSON.stringify({ type: 'offer', name: 'huge', size: 2 ** 40 })));
  await alice.evaluate(() => window.__open('{"type":'));
  await eventually(() => alice.evaluate(() => window.__closed.length >= 3), 5000, 'the channels closed by Bob');
  assert.equal(await bob.locator('#chat-log .message').count(), 1, 'only the first offer is in the chat');

  // Nine channels that say nothing: the ninth is closed at once, the
  // others once they have sent no offer for 10 s.
  await alice.evaluate(() => Promise.all(Array.from({ length: 9 }, () => window.__open(null))));
  await eventually(() => seen.warnings.some((w) => w.includes('8 of its files are already under way')), 5000, 'the ninth refused');
  await eventually(() => alice.evaluate(() => window.__closed.filter((c) => c === 'silent').length === 9), 15000, 'all nine closed');
  const warned = (what) => seen.warnings.some((w) => w.includes('stopped a file transfer') && w.includes(what));
  for (const what of ['more than the 10 bytes offered', 'over the 64 GB limit', 'not JSON', 'no offer within 10 s']) {
    assert.ok(warned(what), `a warning says "${what}"`);
  }
  assert.deepEqual(seen.errors, []);

  // A file sent properly goes through after all that.
  await chatButton(alice, 'Chat').click();
  await alice.locator('#file-input').setInputFiles({ name: 'fine.txt', mimeType: 'text/plain', buffer: Buffer.from('fine') });
  await bob.getByRole('button', { name: 'Accept fine.txt' }).click({ timeout: 10000 });
  await bob.getByRole('link', { name: 'Save fine.txt' }).waitFor({ timeout: 5000 });
  for (const p of [alice, bob]) await p.context().close();
});

test('a message or file to one person reaches only them, marked private at both ends; never everyone once they leave', async () => {
  const room = `chat-private-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  const carol = await joinCall(browser, server.url, room, 'Carol');
  await channelsOpen([alice, bob, carol]);
  for (const page of [alice, bob, carol]) await chatButton(page, 'Chat').click();

  // "To" lists the others; Bob is chosen by keyboard.
  const to = alice.getByLabel('To', { exact: true });
  assert.deepEqual(await to.locator('option').allTextContents(), ['Everyone', 'Bob', 'Carol']);
  await to.focus();
  await alice.keyboard.press('ArrowDown');
  assert.equal(await to.locator('option:checked').textContent(), 'Bob');
  await write(alice, 'just between us');
  await log(bob).getByText('just between us').waitFor({ timeout: 5000 });
  assert.equal(await lastMessage(bob).locator('.private-tag').textContent(), 'privately to you');
  assert.equal(await lastMessage(alice).locator('.private-tag').textContent(), 'privately to Bob');
  // A file goes to Bob alone too.
  await alice.locator('#file-input').setInputFiles({ name: 'secret.txt', mimeType: 'text/plain', buffer: Buffer.from('s') });
  await bob.getByRole('button', { name: 'Accept secret.txt' }).waitFor({ timeout: 10000 });
  assert.equal(await bob.locator('.message.file').last().locator('.private-tag').textContent(), 'privately to you');
  assert.deepEqual(await alice.locator('.message.file .deliveries li').evaluateAll((lis) => lis.map((li) => li.dataset.peerId)),
    [await bob.evaluate(() => window.__callisto.id)], 'offered to Bob only');

  // Then to everyone: Carol gets that, and only that.
  await to.selectOption({ label: 'Everyone' });
  await write(alice, 'hello all');
  for (const page of [bob, carol]) await log(page).getByText('hello all').waitFor({ timeout: 5000 });
  assert.equal(await lastMessage(carol).locator('.private-tag').count(), 0);
  assert.equal(await log(carol).getByText('just between us').count(), 0, 'Carol never got the private message');
  assert.equal(await log(carol).getByText('secret.txt').count(), 0, 'nor the file');

  // Bob chosen again, then he leaves: "To" says so and keeps him chosen,
  // and a message is kept in the box, not sent to anyone.
  await to.selectOption({ label: 'Bob' });
  await bob.getByRole('button', { name: 'Leave' }).click();
  await eventually(async () => (await to.locator('option:checked').textContent()) === 'Bob (left the call)', 10000, 'Bob is marked as gone');
  await write(alice, 'are you still there?');
  await alice.getByText('the person you chose in “To” has left the call').waitFor({ timeout: 5000 });
  assert.equal(await alice.getByRole('textbox', { name: 'Message' }).inputValue(), 'are you still there?', 'the message stays in the box');
  await carol.waitForTimeout(500);
  assert.equal(await log(carol).getByText('are you still there?').count(), 0, 'nobody got it');
  await to.selectOption({ label: 'Carol' });
  assert.deepEqual(await to.locator('option').allTextContents(), ['Everyone', 'Carol'], 'the one who left goes once someone else is chosen');
  await alice.getByRole('textbox', { name: 'Message' }).press('Enter');
  await log(carol).getByText('are you still there?').waitFor({ timeout: 5000 });
  assert.equal(await lastMessage(carol).locator('.private-tag').textContent(), 'privately to you');

  // A second Carol: the two are told apart, and the first stays chosen.
  const carol2 = await joinCall(browser, server.url, room, 'Carol');
  await eventually(async () => (await to.locator('option').count()) === 3, 10000, 'the second Carol is listed');
  assert.deepEqual(await to.locator('option').allTextContents(), ['Everyone', 'Carol (1)', 'Carol (2)']);
  assert.equal(await to.inputValue(), await carol.evaluate(() => window.__callisto.id));
  for (const p of [alice, bob, carol, carol2]) await p.context().close();
});
