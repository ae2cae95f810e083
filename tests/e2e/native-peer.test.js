// The native peer (`callisto peer`, str0m) in a call with real headless
// Chromium pages: it meets them both ways (it offers to those already in
// the room; newcomers offer to it), chats with them over the chat data
// channel, receives their camera and microphone, and sends its own test
// pattern and tone, which they play.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { ARTIFACTS, serverAndBrowser, startServer, joinCall, startPeer, channelsOpen, pickRandomFile, connectionReport, isTestAddress, assertOnlyTestAddresses, eventually, waitForRemoteVideos, writeChat as write } from './lib.js';

let server;
let browser;
serverAndBrowser({}, (s, b) => { server = s; browser = b; });

const messages = (page) => page.getByRole('log', { name: 'Messages' }).locator('.message').evaluateAll(
  (items) => items.map((m) => ({ author: m.querySelector('.author')?.textContent, text: m.querySelector('.text')?.textContent })),
);

test('a native peer calls browsers both ways, chats with them, receives their media and sends its own', async () => {
  const room = `native-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');

  // The robot joins after Alice: it offers to her.
  const robot = startPeer(server.url, room, 'Robot', ['--send-media']);
  const joined = await robot.waitFor((e) => e.event === 'joined', 'joined');
  assert.deepEqual(joined.peers.map((p) => p.name), ['Alice']);
  const aliceId = joined.peers[0].id;
  await robot.waitFor((e) => e.event === 'connected' && e.id === aliceId, 'connected to Alice');

  // Bob joins after both: he offers to the robot.
  const bob = await joinCall(browser, server.url, room, 'Bob');
  const bobJoined = await robot.waitFor((e) => e.event === 'peer-joined' && e.name === 'Bob', 'Bob joined');
  await robot.waitFor((e) => e.event === 'connected' && e.id === bobJoined.id, 'connected to Bob');

  for (const [page, label] of [[alice, 'Alice'], [bob, 'Bob']]) {
    const report = await eventually(async () => {
      const r = await connectionReport(page);
      return r.length === 2 && r.every((c) => c.state === 'connected' && c.pair) && r;
    }, 20000, `${label}'s two connections (Bob or Alice, and the robot) up`);
    for (const { pair } of report) {
      assert.ok(isTestAddress(pair.local.address) && isTestAddress(pair.remote.address), `${label}: ${JSON.stringify(pair)}`);
    }
    // The robot's camera and microphone, on its own connection and the
    // other's alike: its test pattern plays in its tile, its tone is heard.
    await page.locator('.tile', { hasText: 'Robot' }).waitFor({ timeout: 10000 });
    await waitForRemoteVideos(page, 2);
    await eventually(async () => (await connectionReport(page)).every((c) => c.audio?.energy > 0), 10000, `${label} hears the robot and the other`);
    assert.equal(await page.locator('.tile', { hasText: 'Robot' }).locator('.badge.camera').isVisible(), false, 'its camera shows as on');
    // Its tone, with the level it sends in each packet, marks it speaking.
    await page.locator('.tile.speaking', { hasText: 'Robot' }).waitFor({ timeout: 5000 });
  }

  const shot = path.join(ARTIFACTS, 'native-peer.png');
  await alice.screenshot({ path: shot });
  console.log(`# artifact: ${shot}`);

  // Chat both ways, over the data channels.
  for (const page of [alice, bob]) await page.getByRole('button', { name: 'Chat', exact: true }).click();
  await write(alice, 'hello robot 🤖');
  const heard = await robot.waitFor((e) => e.event === 'chat' && e.text === 'hello robot 🤖', 'Alice\'s message');
  assert.deepEqual([heard.name, heard.from, heard.private], ['Alice', aliceId, false]);
  robot.say('beep boop');
  for (const [page, label] of [[alice, 'Alice'], [bob, 'Bob']]) {
    await eventually(async () => (await messages(page)).some((m) => m.author === 'Robot' && m.text === 'beep boop'), 10000, `${label} reads the robot`);
  }

  // A private message from Bob reaches the robot alone, marked so.
  await bob.getByLabel('To', { exact: true }).selectOption({ label: 'Robot' });
  await write(bob, 'just between us');
  const secret = await robot.waitFor((e) => e.event === 'chat' && e.text === 'just between us', 'Bob\'s private message');
  assert.equal(secret.private, true);

  // Media from both browsers' fake camera and microphone.
  await new Promise((r) => setTimeout(r, 3000));
  const { code, left } = await robot.stop();
  assert.equal(code, 0, robot.logs.join('\n'));
  assert.equal(left.peers.length, 2);
  for (const p of left.peers) {
    assert.ok(p.connected, `${p.name} connected`);
    assert.ok(p.videoFrames > 20, `video frames from ${p.name}: ${p.videoFrames}`);
    assert.ok(p.audioFrames > 50, `audio frames from ${p.name}: ${p.audioFrames}`);
    assert.ok(p.sentVideoFrames > 20 && p.sentAudioFrames > 50, `sent to ${p.name}: ${JSON.stringify(p)}`);
  }
  // Its going is seen at once (a leave, not a lost connection).
  for (const page of [alice, bob]) {
    await page.locator('.tile', { hasText: 'Robot' }).waitFor({ state: 'detached', timeout: 5000 });
  }
  assert.equal((await messages(alice)).filter((m) => m.text === 'just between us').length, 0, 'the private message did not reach Alice');
  assertOnlyTestAddresses();
  await alice.context().close();
  await bob.context().close();
});

test('a native peer saves the files it is offered with --save-files, and declines them without', async () => {
  const room = `native-files-${Date.now()}`;
  const dir = mkdtempSync(path.join(tmpdir(), 'callisto-files-'));
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const saver = startPeer(server.url, room, 'Saver', ['--save-files', dir]);
  const decliner = startPeer(server.url, room, 'Decliner');
  await channelsOpen([alice], 2);

  // Random bytes, 2 MiB and a tail, sent to everyone: twice, under the
  // same name (the second is saved beside the first, not over it).
  await alice.getByRole('button', { name: 'Chat', exact: true }).click();
  const name = 'report <1>.bin';
  const send = () => pickRandomFile(alice, name, 2 * 1024 * 1024 + 321);
  const sha256 = (file) => createHash('sha256').update(readFileSync(file)).digest('hex');
  const first = await send();
  const saved = await saver.waitFor((e) => e.event === 'file-saved', 'the first file saved');
  assert.equal(saved.file, name);
  assert.equal(saved.name, 'Alice');
  assert.equal(saved.size, 2 * 1024 * 1024 + 321);
  assert.equal(saved.path, path.join(dir, name));
  assert.equal(sha256(saved.path), first, 'saved whole');
  const declined = await decliner.waitFor((e) => e.event === 'file-declined', 'the file declined');
  assert.deepEqual([declined.file, declined.size], [name, saved.size]);
  const delivery = (who) => alice.locator('.deliveries li', { hasText: `${who}:` });
  await delivery('Saver').first().getByText('delivered').waitFor({ timeout: 10000 });
  await delivery('Decliner').first().getByText('declined').waitFor({ timeout: 10000 });

  const second = await send();
  const again = await saver.waitFor((e) => e.event === 'file-saved' && e !== saved, 'the second file saved');
  assert.equal(again.path, path.join(dir, 'report <1> (1).bin'));
  assert.equal(sha256(again.path), second);
  assert.equal(sha256(saved.path), first, 'the first left as it was');
  assert.deepEqual(readdirSync(dir).sort(), ['report <1> (1).bin', name]);
  for (const robot of [saver, decliner]) assert.equal((await robot.stop()).code, 0);
  await alice.context().close();
  rmSync(dir, { recursive: true, force: true });
});

test('the native peer says clearly what is wrong, and exits non-zero', async () => {
  const room = `native-bad-${Date.now()}`;
  const badName = startPeer(server.url, room, '   ');
  assert.notEqual(await badName.exited, 0);
  assert.match(badName.logs.join('\n'), /bad-name/);
  const noServer = startPeer('http://127.0.0.1:9', room, 'Robot');
  assert.notEqual(await noServer.exited, 0);
  assert.match(noServer.logs.join('\n'), /127\.0\.0\.1:9/);
  const noFolder = startPeer(server.url, room, 'Robot', ['--save-files', '/nonexistent/folder']);
  assert.notEqual(await noFolder.exited, 0);
  assert.match(noFolder.logs.join('\n'), /--save-files \/nonexistent\/folder: not a folder; give one that exists/);
});

test('a native peer and a browser keep their call through a restart of the server, under their new ids', async () => {
  const first = await startServer();
  const port = new URL(first.url).port;
  const room = `native-restart-${Date.now()}`;
  const alice = await joinCall(browser, first.url, room, 'Alice');
  const robot = startPeer(first.url, room, 'Robot');
  await robot.waitFor((e) => e.event === 'connected', 'connected to Alice');
  await alice.evaluate(() => { window.__before = [...window.__callisto.links.values()][0].pc; });

  assert.equal(await first.stop(), 0);
  await robot.waitFor((e) => e.event === 'signaling-lost', 'the loss');
  const second = await startServer([], { listen: `127.0.0.1:${port}` });
  const back = await robot.waitFor((e) => e.event === 'rejoined', 'back', 40000);
  assert.equal(back.resumed, false, 'a new server knows no place');

  // Each told the other its new id over their connection ("moved"),
  // and each answered: the same connection goes on, by the new ids.
  const links = () => alice.evaluate(() => [...window.__callisto.links.entries()].map(([id, l]) => ({ id, state: l.pc.connectionState, same: l.pc === window.__before })));
  await eventually(async () => {
    const now = await links();
    return now.length === 1 && now[0].id === back.id && now[0].state === 'connected' && now;
  }, 40000, 'Alice connected to the robot by its new id, and to nothing else');
  assert.equal((await links())[0].same, true, 'the connection from before the restart');
  // Alice may come back to the server after the robot: she tells it her
  // new id over the connection before anything else she writes there.
  const aliceId = await eventually(() => alice.evaluate(() => window.__callisto.id), 20000, 'Alice back with the server');

  await alice.getByRole('button', { name: 'Chat', exact: true }).click();
  await write(alice, 'are you back?');
  const heard = await robot.waitFor((e) => e.event === 'chat' && e.text === 'are you back?', 'Alice after the restart');
  assert.equal(heard.from, aliceId);
  robot.say('back');
  await eventually(async () => (await messages(alice)).some((m) => m.author === 'Robot' && m.text === 'back'), 10000, 'Alice reads the robot');
  assert.equal(robot.events.filter((e) => e.event === 'connected').length, 1, 'one connection, never made again');
  const { code, left } = await robot.stop();
  assert.equal(code, 0, robot.logs.join('\n'));
  assert.deepEqual(left.peers.map((p) => p.id), [aliceId]);
  await alice.context().close();
  assert.equal(await second.stop(), 0);
});

test('a native peer that offers only a relay reaches a browser through the TURN server', async () => {
  const room = `native-relay-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const robot = startPeer(server.url, room, 'Robot', ['--relay-only']);
  await robot.waitFor((e) => e.event === 'connected', 'connected to Alice');
  const report = await eventually(async () => {
    const r = await connectionReport(alice);
    return r.length === 1 && r[0].state === 'connected' && r[0].pair && r;
  }, 20000, 'Alice connected to the robot');
  // The robot's end of the pair is its relay, on the server's TURN.
  assert.equal(report[0].pair.remote.type, 'relay', JSON.stringify(report[0].pair));
  assert.ok(isTestAddress(report[0].pair.remote.address));
  await alice.getByRole('button', { name: 'Chat', exact: true }).click();
  await write(alice, 'through the relay?');
  await robot.waitFor((e) => e.event === 'chat' && e.text === 'through the relay?', 'the message');
  await new Promise((r) => setTimeout(r, 2000));
  const { code, left } = await robot.stop();
  assert.equal(code, 0, robot.logs.join('\n'));
  assert.ok(left.peers[0].videoFrames > 10, `video through the relay: ${left.peers[0].videoFrames} frames`);
  await alice.context().close();
});
