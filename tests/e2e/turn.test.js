// Calls forced through the built-in TURN server: relay candidates only,
// over UDP, then TCP, then TLS (on a port of its own, and on the web
// server's HTTPS port), then one side over TCP and the other over
// UDP, then over UDP through the kernel relay (also with a bandwidth
// limit, and over IPv6), and through a server's alternate, with the
// iceServers from `welcome`.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { serverAndBrowser, startServer, joinCall, waitForRemoteVideos, connectionReport, eventually, assertOnlyTestAddresses } from './lib.js';

let server;
let browser;
serverAndBrowser({
  serverArgs: ['--tls-self-signed', '--tls-name', 'localhost', '--turn-tls-listen', '127.0.0.1:0'],
  // The TURN server's certificate is self-signed; the web page's is too.
  browserOptions: { extraArgs: ['--ignore-certificate-errors'] },
}, (s, b) => { server = s; browser = b; });

/**
 * A and B join `room`, relayed over `overA` and `overB` ('udp', 'tcp' or
 * 'tls'): both see the other's video over a relay/relay candidate pair
 * with those protocols. Returns their pages.
 */
async function relayedCall(room, overA, overB, via = server, relayAddress = '127.0.0.1', beforeB = async () => {}) {
  const contextOptions = { ignoreHTTPSErrors: true };
  const a = await joinCall(browser, via.url, room, 'A', { relayOver: overA, contextOptions });
  await beforeB(a);
  const b = await joinCall(browser, via.url, room, 'B', { relayOver: overB, contextOptions });
  await waitForRemoteVideos(a, 1, 30000);
  await waitForRemoteVideos(b, 1, 30000);
  for (const [who, page, transport] of [['A', a, overA], ['B', b, overB]]) {
    const [c] = await eventually(async () => {
      const r = await connectionReport(page);
      return r.length === 1 && r[0].state === 'connected' && r[0].pair?.local && r;
    }, 15000, `${who} connected`);
    assert.equal(c.pair.local.type, 'relay', `${who}: local candidate is a relay`);
    assert.equal(c.pair.remote.type, 'relay', `${who}: remote candidate is a relay`);
    assert.equal(c.pair.local.relayProtocol, transport, `${who}: relayed over ${transport}`);
    assert.equal(c.pair.local.address, relayAddress);
    assert.ok(c.audio?.packets > 0, `${who}: audio arrives`);
  }
  return [a, b];
}

for (const transport of ['udp', 'tcp', 'tls']) {
  test(`a call relayed through TURN over ${transport}`, async () => {
    const pages = await relayedCall(`relay-${transport}-${Date.now()}`, transport, transport);
    assertOnlyTestAddresses();
    // The live stats say so too.
    await pages[0].getByRole('button', { name: 'Stats' }).click();
    await pages[0].locator('.tile:not(.local) .stats').getByText(`relayed (TURN over ${transport.toUpperCase()})`).waitFor({ timeout: 5000 });
    for (const p of pages) await p.context().close();
  });
}

test('a call relayed through TURN over TLS on the web server\'s HTTPS port', async () => {
  // TLS, and no TURN listener for TLS of its own: TURN over TLS shares the
  // HTTPS port, for browsers that may reach nothing else.
  const shared = await startServer(['--tls-self-signed', '--tls-name', 'localhost']);
  try {
    const room = `relay-web-port-${Date.now()}`;
    const pages = await relayedCall(room, 'tls', 'tls', shared);
    const port = new URL(shared.url).port;
    for (const page of pages) {
      const [c] = await connectionReport(page);
      assert.equal(c.pair.local.url, `turns:localhost:${port}?transport=tcp`);
    }
    const relayed = await counter(pages[0], 'callisto_turn_relayed_packets_total{direction="to_peer",transport="tls"}', shared);
    assert.ok(relayed > 0, `TURN over TLS relayed ${relayed} packets`);
    assertOnlyTestAddresses();
    for (const p of pages) await p.context().close();
  } finally {
    assert.equal(await shared.stop(), 0);
  }
});

test('a TURN server sends browsers to its alternate, and the call is relayed there', async () => {
  // Two servers with one secret: the first sends every Allocate to the
  // second (300 Try Alternate), and the browsers, given the first's TURN
  // URLs, follow. Chromium follows no redirection to a loopback address,
  // so the second listens and relays on the namespace's 198.18.0.1
  // (run.sh); its relay ports tell its relays apart too.
  const secret = 'shared-by-both-servers';
  const alternate = await startServer(['--turn-secret', secret, '--turn-port-range', '40000-40999'], { turnListen: '198.18.0.1:0' });
  const first = await startServer(['--turn-secret', secret, '--turn-alternate-server', alternate.turn.udp]);
  try {
    // The first server sends clients only to an alternate it has seen answer.
    const inForce = 'callisto_turn_alternate_servers{transport="udp_tcp"}';
    const deadline = Date.now() + 10_000;
    while (await metric(first, inForce) !== 1) {
      assert.ok(Date.now() < deadline, 'the first server never saw its alternate answer');
      await new Promise((r) => setTimeout(r, 100));
    }
    for (const transport of ['udp', 'tcp']) {
      const [a, b] = await relayedCall(`relay-alternate-${transport}-${Date.now()}`, transport, transport, first, '198.18.0.1');
      for (const page of [a, b]) {
        const [c] = await connectionReport(page);
        assert.ok(c.pair.local.port >= 40000 && c.pair.local.port <= 40999, `relayed by the alternate (relay port ${c.pair.local.port})`);
        const firstPort = new URL(`turn://${first.turn.udp}`).port;
        assert.match(c.pair.local.url, new RegExp(`:${firstPort}\\?transport=${transport}$`), 'the browser was given the first server');
      }
      const redirected = await counter(a, `callisto_turn_redirected_total{transport="${transport}"}`, first);
      const allocatedHere = await counter(a, 'callisto_turn_allocations', first);
      console.log(`# report: over ${transport}: ${redirected} Allocate requests sent to the alternate, ${allocatedHere} allocations on the first server`);
      assert.ok(redirected >= 2, `both browsers were sent on (${redirected})`);
      assert.equal(allocatedHere, 0);
      for (const p of [a, b]) await p.context().close();
    }
    assertOnlyTestAddresses();
  } finally {
    assert.equal(await first.stop(), 0);
    assert.equal(await alternate.stop(), 0);
  }
});

test('a page in a room longer than its TURN credentials last gets new ones, and relays a newcomer\'s call', async () => {
  // Credentials valid for 10 s, renewed every 5 s. A's from `welcome`
  // have expired by the time B joins: A's connection to B allocates with
  // renewed ones, or it gets no relay candidate at all.
  const short = await startServer(['--turn-credential-ttl', '10']);
  try {
    const expiry = (servers) => Number(servers.find((s) => s.username)?.username.split(':')[0]);
    let welcomed;
    const [a, b] = await relayedCall(`relay-renewed-${Date.now()}`, 'udp', 'udp', short, '127.0.0.1', async (page) => {
      welcomed = expiry((await page.evaluate(() => window.__received.find((m) => m.type === 'welcome'))).iceServers);
      assert.ok(welcomed > Date.now() / 1000, 'welcome has credentials that have not expired yet');
      // B joins just after a renewal, so that A's newest credentials still
      // hold when A's connection to B allocates: they last 10 s, and B's
      // join, offer and A's answer took over 5 s once in a loaded run,
      // after which A had no credentials that held (one failure, locally).
      await eventually(async () => {
        const renewed = await page.evaluate(() => window.__received.filter((m) => m.type === 'ice-servers').map((m) => m.iceServers));
        return Date.now() / 1000 > welcomed + 1 && renewed.some((s) => expiry(s) > Date.now() / 1000 + 8);
      }, 20000, 'A holds freshly renewed credentials, and those from welcome have expired');
    });
    const configured = () => a.evaluate(() => window.__pcs.map((pc) => pc.getConfiguration().iceServers)[0]);
    const used = await configured();
    assert.ok(expiry(used) > welcomed, `A's connection to B used renewed credentials (expiry ${expiry(used)}, welcome's ${welcomed})`);
    // The next renewal reaches the open connection too (setConfiguration),
    // for its next ICE restart.
    await eventually(async () => expiry(await configured()) > expiry(used), 12000, 'the open connection takes the next renewal');
    assertOnlyTestAddresses();
    for (const p of [a, b]) await p.context().close();
  } finally {
    assert.equal(await short.stop(), 0);
  }
});

/** A metric of `via` (`name` with its labels), or 0, read without a page. */
async function metric(via, name) {
  const text = await (await fetch(`${via.url}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(' ')[1]) : 0;
}

/** A counter from the server's metrics (`name` with its labels), or 0. */
async function counter(page, name, via = server) {
  const text = await (await page.request.get(`${via.url}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(' ')[1]) : 0;
}

/** The server's count of packets relayed in place between two allocations. */
const inPlacePackets = (page) => counter(page, 'callisto_turn_relayed_in_place_packets_total');

test('a call relayed through TURN over UDP goes in place, channel or not', async () => {
  const [a, b] = await relayedCall(`relay-in-place-${Date.now()}`, 'udp', 'udp');
  // Both browsers are clients of this server: everything between them is
  // relayed in place by the workers, as ChannelData where the receiver
  // bound a channel and as Data indications where it did not. (Here, with
  // one interface per browser, the runs so far had channels both ways; a
  // browser with more interfaces often receives on an allocation without a
  // channel to the sender. The server's unit tests and its across-workers
  // property cover that case.)
  const toClient = 'callisto_turn_relayed_packets_total{direction="to_client",transport="udp"}';
  const window = async () => {
    const text = await (await a.request.get(`${server.url}/metrics`)).text();
    const value = (name) => Number(text.split('\n').find((l) => l.startsWith(`${name} `))?.split(' ')[1] ?? 0);
    return { inPlace: value('callisto_turn_relayed_in_place_packets_total'), relayed: value(toClient) };
  };
  const start = await window();
  await eventually(async () => (await counter(a, toClient)) > start.relayed + 1000, 15000, 'media relayed');
  const end = await window();
  const inPlace = end.inPlace - start.inPlace;
  const relayed = end.relayed - start.relayed;
  console.log(`# report: relayed over UDP: ${inPlace} of ${relayed} packets to the browsers in place`);
  assert.ok(inPlace * 10 >= relayed * 9, `only ${inPlace} of ${relayed} packets relayed in place`);
  assertOnlyTestAddresses();
  for (const p of [a, b]) await p.context().close();
});

test('a call relayed between TURN over TCP and TURN over UDP goes in place', async () => {
  const [a, b] = await relayedCall(`relay-mixed-${Date.now()}`, 'tcp', 'udp');
  // The media between a TCP connection's allocation and a UDP client's
  // skips the relay sockets: through the connection's inbox one way, from
  // the UDP listening socket the other.
  const start = await inPlacePackets(a);
  await eventually(async () => (await inPlacePackets(a)) > start + 200, 15000, 'media relayed in place');
  assertOnlyTestAddresses();
  for (const p of [a, b]) await p.context().close();
});

/**
 * A relay/relay call over UDP through `kernel`, a server of its own with
 * the XDP program on this namespace's loopback, its relays on
 * `relayAddress`: once the kernel is relaying, the workers relay under a
 * tenth of what it does, each way.
 */
async function callThroughTheKernel(kernel, room, relayAddress) {
  const [a, b] = await relayedCall(room, 'udp', 'udp', kernel, relayAddress);
  // The media leaves through the kernel both ways: on the browsers'
  // channels toward the peers, and toward the browsers as ChannelData or,
  // from an allocation the receiver has no channel for (each browser
  // allocates once per network interface), as Data indications. The
  // window starts once the kernel is relaying: Chromium sends its first
  // media as Send indications, before its channel is bound, and those
  // the workers relay.
  const bytes = async (dir) => {
    const all = await counter(a, `callisto_turn_relayed_bytes_total{direction="${dir}",transport="udp"}`, kernel);
    const inKernelBytes = await counter(a, `callisto_turn_relayed_in_kernel_bytes_total{direction="${dir}"}`, kernel);
    return { kernel: inKernelBytes, workers: all - inKernelBytes };
  };
  const both = async () => ({ to_peer: await bytes('to_peer'), to_client: await bytes('to_client') });
  const start = await both();
  const grew = (from, by) => async () => {
    const now = await both();
    return ['to_peer', 'to_client'].every((d) => now[d].kernel > from[d].kernel + by);
  };
  await eventually(grew(start, 20000), 15000, 'media relayed in the kernel both ways');
  const before = await both();
  await eventually(grew(before, 100000), 15000, 'more media relayed in the kernel both ways');
  const after = await both();
  for (const dir of ['to_peer', 'to_client']) {
    const byWorkers = after[dir].workers - before[dir].workers;
    const byKernel = after[dir].kernel - before[dir].kernel;
    console.log(`# report: kernel relay (${relayAddress}), ${dir}: ${byKernel} bytes by the kernel, ${byWorkers} by the workers`);
    assert.ok(byWorkers * 10 < byKernel, `${dir}: the workers relayed ${byWorkers} bytes while the kernel relayed ${byKernel}`);
  }
  assertOnlyTestAddresses();
  for (const p of [a, b]) await p.context().close();
}

test('a call relayed through TURN over UDP goes through the kernel relay', async () => {
  const kernel = await startServer(['--turn-kernel-relay', 'lo']);
  try {
    await callThroughTheKernel(kernel, `relay-kernel-${Date.now()}`, '127.0.0.1');
  } finally {
    assert.equal(await kernel.stop(), 0);
  }
});

test('a call relayed through TURN over UDP and IPv6 goes through the kernel relay', async () => {
  // RFC 6156: a TURN server listening on IPv6 relays on IPv6. Browsers
  // ask for no family; with no IPv4 relay, they get their own, unasked.
  const kernel = await startServer(['--turn-kernel-relay', 'lo'], { turnListen: '[::1]:0' });
  try {
    await callThroughTheKernel(kernel, `relay-kernel6-${Date.now()}`, '::1');
  } finally {
    assert.equal(await kernel.stop(), 0);
  }
});

test('a call relayed through the kernel relay keeps to the bandwidth limit, and still plays', async () => {
  // Per allocation and direction: room for audio and low-rate video (in
  // the same window of an unlimited call, each browser sent about 45 kB/s,
  // three times this, and rising).
  const limit = 15000;
  const kernel = await startServer(['--turn-kernel-relay', 'lo', '--turn-bps-per-allocation', String(limit)]);
  try {
    const [a, b] = await relayedCall(`relay-limited-${Date.now()}`, 'udp', 'udp', kernel);
    const metric = (name) => counter(a, name, kernel);
    const relayed = async () => {
      const out = {};
      for (const dir of ['to_peer', 'to_client']) {
        out[dir] = {
          all: await metric(`callisto_turn_relayed_bytes_total{direction="${dir}",transport="udp"}`),
          kernel: await metric(`callisto_turn_relayed_in_kernel_bytes_total{direction="${dir}"}`),
        };
      }
      return out;
    };
    const t0 = Date.now();
    const start = await relayed();
    await new Promise((r) => setTimeout(r, 6000));
    const end = await relayed();
    const seconds = (Date.now() - t0) / 1000;
    // Two allocations carry the media each way (each browser sends from
    // its selected pair's and receives on the one the other side chose);
    // each of their budgets holds at most a second's bytes when the window
    // opens, and the kernel's counts reach the metrics up to a second late
    // at either end: two seconds' more at most.
    const allowed = 2 * limit * (seconds + 2);
    for (const dir of ['to_peer', 'to_client']) {
      const bytes = end[dir].all - start[dir].all;
      const byKernel = end[dir].kernel - start[dir].kernel;
      console.log(`# report: limited to ${limit} B/s per allocation, ${dir}: ${bytes} bytes in ${seconds.toFixed(1)} s, ${byKernel} by the kernel`);
      assert.ok(bytes <= allowed, `${dir}: ${bytes} bytes in ${seconds} s, at most ${allowed}`);
      assert.ok(byKernel > 0, `${dir}: the kernel relays under the limit too`);
    }
    // And the call is still on: video keeps arriving at both ends.
    for (const page of [a, b]) await waitForRemoteVideos(page, 1, 10000);
    const over = await metric('callisto_turn_over_budget_packets_total{direction="to_peer"}');
    console.log(`# report: ${over} packets to peers dropped over budget`);
    assertOnlyTestAddresses();
    for (const p of [a, b]) await p.context().close();
  } finally {
    assert.equal(await kernel.stop(), 0);
  }
});
