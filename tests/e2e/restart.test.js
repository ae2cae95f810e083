// Calls outlive the server's restart, and a place lost past the grace:
// the browsers' connections carry the media, and only the signaling under
// them starts again, under new ids, told peer to peer over each link.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { startServer, launchBrowser, joinCall, askToJoin, waitForRemoteVideos, videoFlows, eventually, cuttableProxy } from './lib.js';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

const idOf = (page) => page.evaluate(() => window.__callisto.id);
/** Marks the page's connections, to tell later whether they are the same ones. */
const mark = (page) => page.evaluate(() => { for (const l of window.__callisto.links.values()) l.pc.__mark = true; });
/** Per link of the page: its id and whether its connection is one marked before. */
const links = (page) => page.evaluate(() => [...window.__callisto.links.entries()].map(([id, l]) => ({ id, kept: l.pc.__mark === true, state: l.pc.connectionState })));

test('a call goes on through a restart of the server, on the same connections, and the room meets again under new ids', async () => {
  const first = await startServer();
  const port = new URL(first.url).port;
  const room = `restart-${Date.now()}`;
  const a = await joinCall(browser, first.url, room, 'A');
  const b = await joinCall(browser, first.url, room, 'B');
  await waitForRemoteVideos(a, 1);
  await waitForRemoteVideos(b, 1);
  const [aOld, bOld] = [await idOf(a), await idOf(b)];
  await mark(a);
  await mark(b);
  const connections = () => Promise.all([a, b].map((p) => p.evaluate(() => window.__pcs.length)));
  const before = await connections();
  // The room is locked: the lock goes with the old server, and they are told.
  await a.getByRole('button', { name: 'Lock room' }).click();
  await b.getByRole('button', { name: 'Unlock room' }).waitFor({ timeout: 5000 });

  assert.equal(await first.stop(), 0);
  for (const p of [a, b]) await p.getByText(/Lost the connection to the server/).waitFor({ timeout: 5000 });
  await videoFlows(a, 'A, with the server down');
  await videoFlows(b, 'B, with the server down');

  const second = await startServer([], { listen: `127.0.0.1:${port}` });
  for (const p of [a, b]) await p.getByText('Reconnected. The server restarted, and the room is no longer locked: lock it again once everyone is back.').waitFor({ timeout: 20000 });
  for (const p of [a, b]) await p.getByRole('button', { name: 'Lock room' }).waitFor({ timeout: 5000 });
  const [aNew, bNew] = [await idOf(a), await idOf(b)];
  assert.ok(aNew !== aOld && bNew !== bOld, 'the new server gave new ids');
  await eventually(async () => {
    const [la, lb] = [await links(a), await links(b)];
    return la.length === 1 && la[0].id === bNew && lb.length === 1 && lb[0].id === aNew;
  }, 10000, 'each knows the other by the new id');
  for (const p of [a, b]) {
    const [link] = await links(p);
    assert.ok(link.kept, 'the connection from before the restart, not a new one');
    assert.equal(link.state, 'connected');
  }
  assert.deepEqual(await connections(), before, 'no connection was made again');
  assert.equal(await a.locator(`.tile[data-peer-id="${bNew}"]`).count(), 1, 'the tile goes by the new id');
  await videoFlows(a, 'A, after the restart');
  await videoFlows(b, 'B, after the restart');

  // Signaling by the new ids works: chat goes, a newcomer meets both, and
  // an ICE restart between the two goes through the new server.
  await a.getByRole('button', { name: 'Chat', exact: true }).click();
  const message = a.getByRole('textbox', { name: 'Message' });
  await message.fill('still here');
  await message.press('Enter');
  await b.getByRole('button', { name: 'Chat (1 new)', exact: true }).waitFor({ timeout: 5000 });
  const c = await joinCall(browser, second.url, room, 'C');
  for (const p of [a, b, c]) await waitForRemoteVideos(p, 2);
  const ufrag = () => a.evaluate((id) => window.__callisto.links.get(id).pc.localDescription.sdp.match(/a=ice-ufrag:(\S+)/)[1], bNew);
  const ufragBefore = await ufrag();
  await a.evaluate((id) => window.__callisto.links.get(id).renegotiate(), bNew);
  await eventually(async () => (await ufrag()) !== ufragBefore, 10000, 'an ICE restart through the new server');
  await videoFlows(b, 'B, after the ICE restart');
  for (const p of [a, b, c]) await p.context().close();
  assert.equal(await second.stop(), 0);
});

test('with a state file, a restart is no more than a dropped connection: the same ids, the room still locked', async () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'callisto-state-'));
  const stateFile = path.join(dir, 'rooms.json');
  const first = await startServer(['--state-file', stateFile]);
  const port = new URL(first.url).port;
  const room = `restart-kept-${Date.now()}`;
  const a = await joinCall(browser, first.url, room, 'A');
  const b = await joinCall(browser, first.url, room, 'B');
  await waitForRemoteVideos(a, 1);
  await waitForRemoteVideos(b, 1);
  const [aId, bId] = [await idOf(a), await idOf(b)];
  await mark(a);
  await mark(b);
  await a.getByRole('button', { name: 'Lock room' }).click();
  await b.getByRole('button', { name: 'Unlock room' }).waitFor({ timeout: 5000 });

  assert.equal(await first.stop(), 0);
  assert.ok(existsSync(stateFile), 'the rooms were kept');
  for (const p of [a, b]) await p.getByText(/Lost the connection to the server/).waitFor({ timeout: 5000 });
  const second = await startServer(['--state-file', stateFile], { listen: `127.0.0.1:${port}` });
  assert.ok(second.logs.some((l) => l.includes('took back the rooms kept by the last run')));
  for (const p of [a, b]) await p.getByText('Reconnected.', { exact: true }).waitFor({ timeout: 20000 });
  assert.deepEqual([await idOf(a), await idOf(b)], [aId, bId], 'the same ids');
  for (const p of [a, b]) {
    await p.getByRole('button', { name: 'Unlock room' }).waitFor({ timeout: 5000 });
    const [link] = await links(p);
    assert.ok(link.kept && link.state === 'connected', 'the connection from before the restart');
    const moved = await p.evaluate(() => window.__received.filter((m) => m.type === 'welcome').map((m) => m.resumed));
    assert.deepEqual(moved, [false, true], 'joined, then resumed: nobody was told of new ids');
  }
  await videoFlows(a, 'A, after the restart');

  // Still locked: a newcomer knocks, and A lets her in.
  const c = await askToJoin(browser, second.url, room, 'C');
  await a.getByRole('button', { name: 'Let C in' }).click({ timeout: 10000 });
  await waitForRemoteVideos(c, 2);
  for (const p of [a, b, c]) await p.context().close();
  assert.equal(await second.stop(), 0);
  rmSync(dir, { recursive: true, force: true });
});

test('a place lost past the grace, with the others gone on: the links they let go are made again', async () => {
  const server = await startServer(['--resume-grace', '0']);
  const proxy = await cuttableProxy(server.url);
  const room = `regrace-${Date.now()}`;
  const a = await joinCall(browser, proxy.url, room, 'A');
  const b = await joinCall(browser, server.url, room, 'B');
  await waitForRemoteVideos(a, 1);
  await waitForRemoteVideos(b, 1);
  const aOld = await idOf(a);
  await mark(a);

  // No grace: the server lets A go at once, and B closes its link to A.
  proxy.cut({ refuseFor: 1500 });
  await a.getByText('Reconnected.').waitFor({ timeout: 20000 });
  const aNew = await idOf(a);
  assert.notEqual(aNew, aOld);
  await eventually(async () => {
    const [la, lb] = [await links(a), await links(b)];
    return la.length === 1 && !la[0].kept && la[0].state === 'connected' && lb.length === 1 && lb[0].id === aNew;
  }, 15000, 'A made its link to B again, and B knows A by its new id');
  await waitForRemoteVideos(a, 1);
  await waitForRemoteVideos(b, 1);
  for (const p of [a, b]) await p.context().close();
  await proxy.close();
  assert.equal(await server.stop(), 0);
});
