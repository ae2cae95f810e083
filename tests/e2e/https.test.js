// Over HTTPS (a self-signed certificate), the same call works.

import { test } from 'node:test';
import assert from 'node:assert/strict';
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
