// Over HTTPS (a self-signed certificate), the same call works.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, renameSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startServer, launchBrowser, joinCall, waitForRemoteVideos } from './lib.js';

test('a call over HTTPS with a self-signed certificate', async () => {
  const server = await startServer(['--tls-self-signed', '--tls-name', 'localhost,127.0.0.1']);
  const browser = await launchBrowser();
  try {
    assert.match(server.url, /^https:\/\//);
    const options = { contextOptions: { ignoreHTTPSErrors: true } };
    const a = await joinCall(browser, server.url, 'secure', 'A', options);
    const b = await joinCall(browser, server.url, 'secure', 'B', options);
    assert.equal(await a.evaluate(() => window.isSecureContext), true);
    await waitForRemoteVideos(a, 1);
    await waitForRemoteVideos(b, 1);
  } finally {
    await browser.close();
    assert.equal(await server.stop(), 0);
  }
});

/** A self-signed certificate for `commonName`, written to `cert` and `key` (each renamed into place whole). */
function writeCertificate(dir, cert, key, commonName) {
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
    '-subj', `/CN=${commonName}`, '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    '-keyout', join(dir, 'new-key.pem'), '-out', join(dir, 'new-cert.pem'),
  ], { stdio: 'ignore' });
  renameSync(join(dir, 'new-key.pem'), key);
  renameSync(join(dir, 'new-cert.pem'), cert);
}

/** The subject of the certificate a new page of `page`'s context is served. */
async function servedSubject(page, url) {
  const probe = await page.context().newPage();
  try {
    const response = await probe.goto(`${url}/healthz`);
    return (await response.securityDetails())?.subjectName;
  } finally {
    await probe.close();
  }
}

test('a certificate renewed during a call ends no call, and who joins after gets the new one', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'callisto-renewal-'));
  const [cert, key] = [join(dir, 'fullchain.pem'), join(dir, 'privkey.pem')];
  writeCertificate(dir, cert, key, 'before.callisto.test');
  const server = await startServer(['--tls-cert', cert, '--tls-key', key, '--tls-recheck', '0']);
  const browser = await launchBrowser();
  try {
    const options = { contextOptions: { ignoreHTTPSErrors: true } };
    const a = await joinCall(browser, server.url, 'renewal', 'A', options);
    const b = await joinCall(browser, server.url, 'renewal', 'B', options);
    await waitForRemoteVideos(a, 1);
    assert.equal(await servedSubject(b, server.url), 'before.callisto.test');

    writeCertificate(dir, cert, key, 'after.callisto.test');
    const seen = server.logs.length;
    server.signal('SIGHUP');
    const deadline = Date.now() + 10_000;
    while (!server.logs.slice(seen).some((l) => l.includes('TLS certificate replaced'))) {
      assert.ok(Date.now() < deadline, 'the server did not replace its certificate');
      await new Promise((r) => setTimeout(r, 50));
    }

    // A and B's signaling connections began before the renewal and go on:
    // they hear of C, and the three see each other.
    const c = await joinCall(browser, server.url, 'renewal', 'C', options);
    assert.equal(await servedSubject(c, server.url), 'after.callisto.test');
    for (const page of [a, b, c]) await waitForRemoteVideos(page, 2);
  } finally {
    await browser.close();
    assert.equal(await server.stop(), 0);
    rmSync(dir, { recursive: true, force: true });
  }
});
