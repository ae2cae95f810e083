// Calls between real headless Chromium pages through the real server, and
// what a page says when the app cannot load.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import path from 'node:path';
import {
  ARTIFACTS, serverAndBrowser, launchBrowser, joinCall, waitForRemoteVideos, playingRemotes,
  connectionReport, isTestAddress, assertOnlyTestAddresses, eventually,
  cuttableProxy,
} from './lib.js';

let server;
let browser;
serverAndBrowser({}, (s, b) => { server = s; browser = b; });

async function assertHealthyMedia(page, remotes, label) {
  const report = await eventually(async () => {
    const r = await connectionReport(page);
    const ok = r.length === remotes && r.every((c) => c.state === 'connected' && c.liveAudio && c.audio?.packets > 0);
    return ok && r;
  }, 15000, `${label}: ${remotes} connected peers with live audio`);
  for (const c of report) {
    assert.ok(isTestAddress(c.pair.local.address), `${label}: local candidate ${c.pair.local.address} is in the test network`);
    assert.ok(isTestAddress(c.pair.remote.address), `${label}: remote candidate ${c.pair.remote.address} is in the test network`);
  }
  assertOnlyTestAddresses();
  // Audio keeps flowing: packet counts grow.
  const first = report.map((c) => c.audio.packets);
  await new Promise((r) => setTimeout(r, 500));
  const later = (await connectionReport(page)).map((c) => c.audio?.packets ?? 0);
  assert.ok(later.every((n, i) => n > first[i]), `${label}: audio packets keep arriving (${first} -> ${later})`);
}

test('two, then three people see and hear each other; leaving removes the tile', async () => {
  const room = `call-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');

  await waitForRemoteVideos(alice, 1);
  await waitForRemoteVideos(bob, 1);
  await assertHealthyMedia(alice, 1, 'Alice');
  await assertHealthyMedia(bob, 1, 'Bob');
  for (const [who, page] of [['Alice', alice], ['Bob', bob]]) {
    const ms = await page.evaluate(() => window.__callisto.joinToFirstFrameMs);
    console.log(`# report: ${who}: Join to first remote frame: ${ms} ms`);
  }

  const carol = await joinCall(browser, server.url, room, 'Carol');
  for (const page of [alice, bob, carol]) await waitForRemoteVideos(page, 2);
  await assertHealthyMedia(carol, 2, 'Carol');
  console.log(`# report: Carol (third): Join to first remote frame: ${await carol.evaluate(() => window.__callisto.joinToFirstFrameMs)} ms`);

  // Names are on the tiles.
  for (const name of ['Alice', 'Bob']) {
    assert.equal(await carol.locator('.tile:not(.local) .name', { hasText: name }).count(), 1);
  }
  const shot = path.join(ARTIFACTS, 'three-person-call.png');
  await alice.screenshot({ path: shot });
  console.log(`# artifact: ${shot}`);

  // "Mute" shows on the others' tile for Alice.
  const aliceId = await alice.evaluate(() => window.__callisto.id);
  await alice.getByRole('button', { name: 'Mute' }).click();
  await alice.getByRole('button', { name: 'Unmute' }).waitFor();
  const mutedBadge = (page) => page.locator(`.tile[data-peer-id="${aliceId}"] .badge.muted`);
  await mutedBadge(bob).waitFor({ state: 'visible', timeout: 5000 });
  await mutedBadge(carol).waitFor({ state: 'visible', timeout: 5000 });
  assert.equal(await mutedBadge(bob).textContent(), 'Muted');
  await alice.getByRole('button', { name: 'Unmute' }).click();
  await mutedBadge(bob).waitFor({ state: 'hidden', timeout: 5000 });

  // Carol clicks Leave: her tile disappears from the others within 5 s.
  const carolId = await carol.evaluate(() => window.__callisto.id);
  await carol.getByRole('button', { name: 'Leave' }).click();
  await carol.getByRole('heading', { name: 'You left the call' }).waitFor();
  for (const page of [alice, bob]) {
    await page.locator(`.tile[data-peer-id="${carolId}"]`).waitFor({ state: 'detached', timeout: 5000 });
  }

  // Bob closes his tab: gone from Alice within 5 s too.
  const bobId = await bob.evaluate(() => window.__callisto.id);
  await bob.close();
  await alice.locator(`.tile[data-peer-id="${bobId}"]`).waitFor({ state: 'detached', timeout: 5000 });
  assert.equal(await alice.locator('.tile:not(.local)').count(), 0);

  for (const p of [alice, carol]) await p.context().close();
});

test('both sides restart ICE at once: one offer, no glare, the call stays up', async () => {
  const room = `restart-${Date.now()}`;
  const a = await joinCall(browser, server.url, room, 'A');
  const b = await joinCall(browser, server.url, room, 'B');
  await waitForRemoteVideos(a, 1);
  await waitForRemoteVideos(b, 1);
  const ufrags = (p) => p.evaluate(() => [...window.__callisto.links.values()]
    .map((l) => /a=ice-ufrag:(\S+)/.exec(l.pc.localDescription.sdp)[1]));
  const initial = [await ufrags(a), await ufrags(b)];

  // Hold both sides' outgoing signals, make both restart ICE, then let what
  // they said cross on the wire. Record every signaling state either side
  // passes through from here on.
  for (const p of [a, b]) {
    await p.evaluate(() => {
      window.__callisto.hold(true);
      window.__states = [];
      for (const link of window.__callisto.links.values()) {
        link.pc.addEventListener('signalingstatechange', () => window.__states.push(link.pc.signalingState));
        link.renegotiate();
      }
    });
  }
  await Promise.all([a, b].map((p) => p.evaluate(() => window.__callisto.hold(false))));

  // Done when both sides hold new ICE credentials, stable and connected.
  for (const [i, p] of [a, b].entries()) {
    await eventually(async () => {
      const settled = await p.evaluate(() => [...window.__callisto.links.values()]
        .every((l) => l.pc.signalingState === 'stable' && l.pc.connectionState === 'connected'));
      return settled && JSON.stringify(await ufrags(p)) !== JSON.stringify(initial[i]);
    }, 10000, 'ICE restarted, stable and connected');
  }
  const sides = await Promise.all([a, b].map((p) => p.evaluate(() => {
    const [link] = window.__callisto.links.values();
    return { polite: link.polite, states: window.__states, glares: link.glares };
  })));
  const polite = sides.find((side) => side.polite);
  assert.ok(polite && !sides.every((side) => side.polite), 'exactly one side is polite');
  assert.ok(!polite.states.includes('have-local-offer'), `the polite side never offered (${polite.states})`);
  assert.deepEqual(sides.map((side) => side.glares), [0, 0], 'no offer collision');
  // Media still flows both ways after the restart.
  await waitForRemoteVideos(a, 1);
  await waitForRemoteVideos(b, 1);
  await assertHealthyMedia(a, 1, 'A');
  await assertHealthyMedia(b, 1, 'B');
  for (const p of [a, b]) await p.context().close();
});

for (const serverNotices of [true, false]) {
  const how = serverNotices ? '' : ', before the server notices';
  test(`a lost signaling connection resumes its place${how}: the call goes on, and whoever came meanwhile is met`, async () => {
    await resumeTest(serverNotices);
  });
}

async function resumeTest(serverNotices) {
  const room = `resume-${Date.now()}`;
  const proxy = await cuttableProxy(server.url);
  const a = await joinCall(browser, proxy.url, room, 'A');
  const b = await joinCall(browser, server.url, room, 'B');
  await waitForRemoteVideos(a, 1);
  await waitForRemoteVideos(b, 1);
  const aId = await a.evaluate(() => window.__callisto.id);
  const bId = await b.evaluate(() => window.__callisto.id);
  await a.evaluate(() => { window.__before = [...window.__callisto.links.values()][0].pc; });

  // A's WebSocket is reset, and A cannot reach the server for 2.5 s: C
  // joins meanwhile (and offers to A, as newcomers do). If the server has
  // not noticed, that offer goes to A's old connection, and is lost.
  proxy.cut({ refuseFor: 2500, serverNotices });
  await a.getByText(/Lost the connection to the server/).waitFor({ timeout: 5000 });
  const c = await joinCall(browser, server.url, room, 'C');
  await a.getByText('Reconnected.').waitFor({ timeout: 15000 });

  assert.equal(await a.evaluate(() => window.__callisto.id), aId, 'A has its id back');
  assert.ok(
    await a.evaluate((id) => window.__callisto.links.get(id)?.pc === window.__before, bId),
    'A\'s connection to B is the one from before the cut: not torn down, not negotiated again',
  );
  const bHeard = await b.evaluate(() => window.__received.map((m) => m.type));
  assert.ok(!bHeard.includes('peer-left'), `B never saw A leave (${bHeard})`);
  for (const page of [a, b, c]) await waitForRemoteVideos(page, 2);
  await assertHealthyMedia(a, 2, 'A');
  await assertHealthyMedia(c, 2, 'C');
  // Chat goes on over the kept link, and reaches whoever came meanwhile.
  await a.getByRole('button', { name: 'Chat', exact: true }).click();
  const message = a.getByRole('textbox', { name: 'Message' });
  await message.fill('after the cut');
  await message.press('Enter');
  for (const page of [b, c]) await page.getByRole('button', { name: 'Chat (1 new)', exact: true }).waitFor({ timeout: 5000 });
  const resumed = await a.evaluate(() => window.__received.filter((m) => m.type === 'welcome').map((m) => m.resumed));
  assert.deepEqual(resumed, [false, true], 'one welcome to join, one to resume');
  const [heldByLink, fromResume] = await a.evaluate((id) => [
    window.__callisto.links.get(id).pc.getConfiguration().iceServers.map((s) => s.username || null),
    window.__received.filter((m) => m.type === 'welcome')[1].iceServers.map((s) => s.username || null),
  ], bId);
  assert.ok(fromResume.some(Boolean), `the resumed welcome has TURN credentials (${fromResume})`);
  assert.deepEqual(heldByLink, fromResume, 'the kept link took the resumed welcome\'s fresh TURN credentials');
  // The token is a secret: the server's log says what happened without it.
  const token = await a.evaluate(() => window.__received.find((m) => m.type === 'welcome').resume);
  if (serverNotices) {
    assert.ok(server.logs.some((l) => l.includes('its place is kept for a resume') && l.includes(aId)), 'the loss is logged');
  }
  assert.ok(server.logs.some((l) => l.includes('"resumed"') && l.includes(aId)), 'the resume is logged');
  assert.ok(!server.logs.some((l) => l.includes(token)), 'no resume token in the log');
  if (!serverNotices) {
    assert.ok(server.logs.some((l) => l.includes('"resumed"') && l.includes(aId)), 'resumed');
  }

  for (const p of [a, b, c]) await p.context().close();
  await proxy.close();
}

test('a raised hand shows on the tile everywhere, newcomers too, is said once, and goes when lowered', async () => {
  const room = `hand-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  await waitForRemoteVideos(bob, 1);
  const aliceId = await alice.evaluate(() => window.__callisto.id);
  const hand = (page, id) => page.locator(`.tile[data-peer-id="${id}"] .badge.hand`);
  // By keyboard.
  await alice.getByRole('button', { name: 'Raise hand' }).focus();
  await alice.keyboard.press('Enter');
  assert.equal(await alice.getByRole('button', { name: 'Lower hand' }).getAttribute('aria-pressed'), 'true');
  await hand(alice, 'local').waitFor({ timeout: 5000 });
  await hand(bob, aliceId).waitFor({ timeout: 5000 });
  assert.equal(await hand(bob, aliceId).textContent(), 'Hand raised');
  await bob.locator('#call-notice', { hasText: 'Alice raised their hand.' }).waitFor({ timeout: 5000 });
  const carol = await joinCall(browser, server.url, room, 'Carol');
  await hand(carol, aliceId).waitFor({ timeout: 10000 });
  await alice.getByRole('button', { name: 'Lower hand' }).click();
  for (const [page, id] of [[alice, 'local'], [bob, aliceId], [carol, aliceId]]) {
    await hand(page, id).waitFor({ state: 'hidden', timeout: 5000 });
  }
  for (const p of [alice, bob, carol]) await p.context().close();
});

/** What each of a page's connections may carry of its camera and its screen (maxBitrate), by peer name. */
const caps = (page) => page.evaluate(() => Object.fromEntries([...window.__callisto.links.values()].map((link) => {
  const videos = link.pc.getTransceivers().filter((t) => t.receiver.track.kind === 'video');
  return [link.name, videos.map((t) => t.sender.getParameters().encodings[0]?.maxBitrate ?? null)];
})));

test('each connection carries a share of one uplink: the caps on what is sent follow how many are in the call', async () => {
  const room = `caps-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  await waitForRemoteVideos(alice, 1);
  // One connection: the whole budget, camera and screen.
  await eventually(async () => JSON.stringify(await caps(alice)) === JSON.stringify({ Bob: [2_500_000, 4_000_000] }), 5000, 'Alice\'s caps with Bob alone');
  const carol = await joinCall(browser, server.url, room, 'Carol');
  await waitForRemoteVideos(alice, 2);
  for (const [page, others] of [[alice, ['Bob', 'Carol']], [bob, ['Alice', 'Carol']], [carol, ['Alice', 'Bob']]]) {
    const expected = Object.fromEntries(others.map((n) => [n, [1_250_000, 2_000_000]]));
    await eventually(async () => JSON.stringify(await caps(page)) === JSON.stringify(expected), 5000, `halves at ${await page.evaluate(() => document.title)}`);
  }
  // The encoder keeps to its cap.
  await eventually(() => alice.evaluate(async () => {
    const targets = [];
    for (const link of window.__callisto.links.values()) {
      const stats = await link.pc.getStats();
      for (const s of stats.values()) if (s.type === 'outbound-rtp' && s.kind === 'video' && s.mid === link.cameraMid) targets.push(s.targetBitrate);
    }
    return targets.length === 2 && targets.every((t) => t > 0 && t <= 1_250_000);
  }), 10000, 'Alice\'s camera encoders aim within their caps');
  await carol.context().close();
  await eventually(async () => JSON.stringify(await caps(alice)) === JSON.stringify({ Bob: [2_500_000, 4_000_000] }), 10000, 'the whole budget again once Carol has left');
  for (const p of [alice, bob]) await p.context().close();
});

/** The tiles marked speaking at any moment of the next `ms`, by label, sampled every 50 ms. */
const markedSpeaking = (page, ms) => page.evaluate(async (ms) => {
  const seen = new Set();
  for (const end = Date.now() + ms; Date.now() < end;) {
    for (const tile of document.querySelectorAll('.tile.speaking')) seen.add(tile.getAttribute('aria-label'));
    await new Promise((r) => setTimeout(r, 50));
  }
  return [...seen].sort();
}, ms);

test('who speaks is marked on their tile, at both ends, and not once muted; who talks muted is told', async () => {
  const room = `speaking-${Date.now()}`;
  const alice = await joinCall(browser, server.url, room, 'Alice');
  const bob = await joinCall(browser, server.url, room, 'Bob');
  await waitForRemoteVideos(alice, 1);
  await waitForRemoteVideos(bob, 1);
  // Chromium's fake microphone beeps every second or so: each beep marks
  // its speaker, on their own page (the microphone's level) and the
  // other's (the level in its audio packets).
  assert.deepEqual(await markedSpeaking(alice, 4000), ['Alice (you)', 'Bob'], 'at Alice');
  assert.deepEqual(await markedSpeaking(bob, 4000), ['Alice', 'Bob (you)'], 'at Bob');

  // Bob mutes: after the mark's hold, his tile is no longer marked
  // anywhere, while Alice's beeps still mark hers.
  const notices = (page) => page.evaluate(() => window.__notices);
  for (const page of [alice, bob]) {
    await page.evaluate(() => {
      const notice = document.getElementById('call-notice');
      window.__notices = [];
      new MutationObserver(() => window.__notices.push(notice.textContent)).observe(notice, { childList: true, characterData: true, subtree: true });
    });
  }
  await bob.getByRole('button', { name: 'Mute' }).click();
  await new Promise((r) => setTimeout(r, 1500));
  assert.deepEqual(await markedSpeaking(alice, 4000), ['Alice (you)'], 'at Alice, Bob is quiet');
  assert.deepEqual(await markedSpeaking(bob, 4000), ['Alice'], 'at Bob, his own tile is quiet too');
  // Bob's microphone still beeps: he was told he is muted, once (not
  // again for 20 s); Alice was not.
  assert.deepEqual((await notices(bob)).filter((n) => n.includes('muted')), ['You are muted: unmute to be heard.']);
  assert.deepEqual((await notices(alice)).filter((n) => n.includes('muted')), []);
  for (const p of [alice, bob]) await p.context().close();
});

test('live stats show each connection\'s path, round trip and rates, and go when turned off', async () => {
  const room = `stats-${Date.now()}`;
  const a = await joinCall(browser, server.url, room, 'A');
  const b = await joinCall(browser, server.url, room, 'B');
  await waitForRemoteVideos(a, 1);
  const button = a.getByRole('button', { name: 'Stats' });
  await button.click();
  assert.equal(await button.getAttribute('aria-pressed'), 'true');
  const box = a.locator('.tile:not(.local) .stats');
  const shown = () => box.evaluate((dl) => Object.fromEntries([...dl.querySelectorAll('dt')].map((dt) => [dt.textContent, dt.nextElementSibling.textContent])));
  // Rates need two samples, a second apart.
  const stats = await eventually(async () => {
    const s = await shown().catch(() => null);
    return s?.Receiving?.endsWith('kbit/s') && s.Sending && s;
  }, 10000, 'stats with rates');
  assert.match(stats.Path, /^direct \(UDP\)$/);
  assert.match(stats['Round trip'], /^\d+ ms$/);
  assert.match(stats.Receiving, /^\d+×\d+, \d+ fps, [\d,]+ kbit\/s$/);
  assert.ok(Number(stats.Receiving.split(', ').at(-1).replace(/\D/g, '')) > 0, `something arrives: ${stats.Receiving}`);
  assert.match(stats.Sending, /^[\d,]+ kbit\/s$/);
  assert.match(stats.Lost, /^\d+\.\d %$/);
  const shot = path.join(ARTIFACTS, 'stats.png');
  await a.screenshot({ path: shot });
  console.log(`# artifact: ${shot}`);
  await button.click();
  assert.equal(await a.locator('.tile .stats').count(), 0, 'turned off, they go');
  for (const p of [a, b]) await p.context().close();
});

test('camera permission denied: joins receive-only, says why, still sees the others', async () => {
  const room = `denied-${Date.now()}`;
  const denyingBrowser = await launchBrowser({ grantMedia: false });
  try {
    const host = await joinCall(browser, server.url, room, 'Host');
    const viewer = await joinCall(denyingBrowser, server.url, room, 'Viewer');
    const notice = viewer.locator('#call-notice');
    await notice.waitFor({ state: 'visible' });
    const text = await notice.textContent();
    assert.match(text, /receive-only/);
    assert.match(text, /permission was denied/);
    await waitForRemoteVideos(viewer, 1);
    // The viewer has no media permission, so Chromium hides its own
    // addresses from its stats; the sockets themselves must still be ours.
    const sockets = assertOnlyTestAddresses();
    assert.ok(sockets > 0);
    for (const c of await connectionReport(host)) assert.ok(isTestAddress(c.pair.local.address), c.pair.local.address);
    // The host sees the viewer's tile, marked as camera off, with no video.
    const viewerId = await viewer.evaluate(() => window.__callisto.id);
    await host.locator(`.tile[data-peer-id="${viewerId}"].camera-off`).waitFor({ timeout: 5000 });
    assert.deepEqual(await playingRemotes(host), []);
    for (const p of [host, viewer]) await p.context().close();
  } finally {
    await denyingBrowser.close();
  }
});

test('a page whose app cannot load says so instead of staying blank', async () => {
  const context = await browser.newContext();
  // One of the app's modules fails, as on a connection that drops mid-load.
  await context.route('**/js/ui.js', (route) => route.abort());
  const page = await context.newPage();
  await page.goto(`${server.url}/r/loading-${Date.now()}`);
  await page.getByRole('status').filter({ hasText: 'Loading…' }).waitFor({ state: 'visible' });
  assert.ok(await page.getByText('If this stays, the app could not load').isVisible(), 'it says what to do');
  assert.equal(await page.getByLabel('Name', { exact: true }).isVisible(), false, 'no pre-join screen without the app');
  // Once the module loads, a reload brings the app, and the notice goes.
  await context.unroute('**/js/ui.js');
  await page.reload();
  await page.getByLabel('Name', { exact: true }).waitFor({ state: 'visible' });
  assert.equal(await page.locator('#loading').isVisible(), false);
  await context.close();
});

test('a page of another site cannot open the signaling WebSocket; the app\'s own page can', async () => {
  // Another site, on another loopback address of this namespace. (A page
  // from a public address would not get as far: Chromium keeps public
  // sites from reaching loopback at all, and the server's check matters
  // when it is on a public address itself.)
  const site = http.createServer((_req, res) => {
    res.setHeader('content-type', 'text/html');
    res.end('<!doctype html><title>elsewhere</title><p>another site</p>');
  });
  await new Promise((resolve) => site.listen(0, '127.0.0.2', resolve));
  const elsewhereUrl = `http://127.0.0.2:${site.address().port}`;
  const context = await browser.newContext();
  const opens = (page) => page.evaluate((url) => new Promise((resolve) => {
    const ws = new WebSocket(url, 'callisto.v1');
    ws.onopen = () => { ws.close(); resolve('open'); };
    ws.onclose = (e) => resolve(`closed ${e.code}`);
  }), `${server.url.replace(/^http/, 'ws')}/ws`);
  try {
    const elsewhere = await context.newPage();
    await elsewhere.goto(elsewhereUrl);
    assert.equal(await opens(elsewhere), 'closed 1006', 'the handshake is refused');
    // It was the server that refused it, having read the page's origin.
    const refused = await eventually(
      () => server.logs.find((l) => l.includes('another site') && l.includes(elsewhereUrl)),
      5000, 'the refusal in the server log');
    assert.match(refused, /"host":"127\.0\.0\.1:\d+"/);

    const own = await context.newPage();
    await own.goto(server.url);
    assert.equal(await opens(own), 'open', 'the app\'s own page connects');
  } finally {
    await context.close();
    site.close();
  }
});
