// Offers a fixed rate of peer-to-peer signaling messages to a server on
// 127.0.0.1 and reports what arrived, and how late:
//
//   node signaling-load.mjs callisto|peerjs PORT PAIRS RATE SECONDS [SERVER_PID]
//
// PAIRS pairs of WebSocket clients; each client sends its partner messages
// of about 200 bytes (the size of an ICE candidate), RATE per second in
// all, for SECONDS. Callisto's pairs join a room each and send `signal`s;
// PeerJS's register ids and send CANDIDATEs. Raw sockets and hand-made
// frames, so that the generator costs little and needs nothing installed.
// With SERVER_PID, also the server's CPU time (user plus system, all
// threads) per message sent in the measured seconds.
import net from 'node:net';
import crypto from 'node:crypto';
import { readFileSync } from 'node:fs';
import { execSync } from 'node:child_process';

const [kind, port, pairs, rate, seconds] = [
  process.argv[2], Number(process.argv[3]), Number(process.argv[4]),
  Number(process.argv[5]), Number(process.argv[6]),
];
const serverPid = process.argv[7];
const hz = Number(execSync('getconf CLK_TCK'));
// Seconds of CPU the server has used so far.
const cpu = () => {
  if (!serverPid) return 0;
  const fields = readFileSync(`/proc/${serverPid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(fields[11]) + Number(fields[12])) / hz;
};
if (!['callisto', 'peerjs'].includes(kind) || !(pairs > 0 && rate > 0 && seconds > 0)) {
  console.error('usage: node signaling-load.mjs callisto|peerjs PORT PAIRS RATE SECONDS');
  process.exit(2);
}

function frame(text, opcode = 1) {
  const data = Buffer.from(text);
  const mask = crypto.randomBytes(4);
  const head = data.length < 126
    ? Buffer.from([0x80 | opcode, 0x80 | data.length])
    : Buffer.from([0x80 | opcode, 0x80 | 126, data.length >> 8, data.length & 0xff]);
  for (let i = 0; i < data.length; i++) data[i] ^= mask[i & 3];
  return Buffer.concat([head, mask, data]);
}

// One client: resolves once upgraded; calls onText for each text frame.
function connect(path, onText) {
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, '127.0.0.1');
    sock.setNoDelay(true);
    let buf = Buffer.alloc(0);
    let upgraded = false;
    sock.on('error', reject);
    sock.on('connect', () => {
      sock.write(`GET ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
        `Sec-WebSocket-Key: ${crypto.randomBytes(16).toString('base64')}\r\nSec-WebSocket-Version: 13\r\n\r\n`);
    });
    sock.on('data', (chunk) => {
      buf = buf.length ? Buffer.concat([buf, chunk]) : chunk;
      if (!upgraded) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) return;
        if (!buf.subarray(0, 12).toString().includes(' 101')) return reject(new Error(`not upgraded: ${buf.subarray(0, 40)}`));
        upgraded = true;
        buf = buf.subarray(end + 4);
        resolve(sock);
      }
      while (buf.length >= 2) {
        let len = buf[1] & 0x7f;
        let at = 2;
        if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); at = 4; }
        else if (len === 127) { if (buf.length < 10) return; len = Number(buf.readBigUInt64BE(2)); at = 10; }
        if (buf.length < at + len) return;
        const opcode = buf[0] & 0x0f;
        const payload = buf.subarray(at, at + len);
        buf = buf.subarray(at + len);
        if (opcode === 1) onText(payload.toString());
        else if (opcode === 9) sock.write(frame(payload, 10));
      }
    });
  });
}

const latencies = [];
let sent = 0;
let received = 0;
let measuring = false;
let measuredSent = 0;
let cpuAtStart = 0;
const pad = 'c'.repeat(150);
function onMessage(msg) {
  const t = kind === 'callisto' ? msg.data?.t : msg.payload?.t;
  if (t === undefined) return;
  received++;
  if (measuring) latencies.push(performance.now() - t);
}

// Each entry: { sock, to } once its partner's id is known.
const clients = [];
for (let i = 0; i < pairs; i++) {
  if (kind === 'peerjs') {
    for (const side of ['a', 'b']) {
      const me = `p${i}${side}`;
      const to = `p${i}${side === 'a' ? 'b' : 'a'}`;
      const sock = await connect(`/peerjs?key=peerjs&id=${me}&token=t${me}`, (text) => {
        const msg = JSON.parse(text);
        if (msg.type === 'CANDIDATE') onMessage(msg);
      });
      clients.push({ sock, to });
    }
  } else {
    const pair = [{}, {}];
    for (const [n, c] of pair.entries()) {
      let joined;
      const welcomed = new Promise((r) => { joined = r; });
      c.sock = await connect('/ws', (text) => {
        const msg = JSON.parse(text);
        if (msg.type === 'welcome') { if (msg.peers.length) c.to = msg.peers[0].id; joined(); }
        else if (msg.type === 'peer-joined') c.to = msg.peer.id;
        else if (msg.type === 'signal') onMessage(msg);
        else if (msg.type === 'error') console.error('error from the server:', text);
      });
      c.sock.write(frame(JSON.stringify({ type: 'join', room: `pair-${i}`, name: `n${i}${n}` })));
      await welcomed;
    }
    clients.push(...pair);
  }
}
await new Promise((r) => setTimeout(r, 500));
if (clients.some((c) => !c.to)) throw new Error('a client does not know its partner');

// Sends in 10 ms ticks, round robin over the clients; the first second
// warms up and is not measured.
const perTick = rate / 100;
let owed = 0;
let next = 0;
const start = performance.now();
await new Promise((done) => {
  const tick = setInterval(() => {
    const elapsed = (performance.now() - start) / 1000;
    if (elapsed >= seconds + 1) { clearInterval(tick); done(); return; }
    if (!measuring && elapsed >= 1) {
      measuring = true;
      cpuAtStart = cpu();
    }
    owed += perTick;
    for (; owed >= 1; owed--) {
      const c = clients[next++ % clients.length];
      const t = performance.now();
      const msg = kind === 'callisto'
        ? { type: 'signal', to: c.to, data: { t, candidate: pad } }
        : { type: 'CANDIDATE', dst: c.to, payload: { t, candidate: pad } };
      c.sock.write(frame(JSON.stringify(msg)));
      sent++;
      if (measuring) measuredSent++;
    }
  }, 10);
});
await new Promise((r) => setTimeout(r, 1000));
const cpuUsed = cpu() - cpuAtStart;
latencies.sort((a, b) => a - b);
const q = (p) => latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))].toFixed(2) : 'n/a';
console.log(JSON.stringify({ kind, pairs, rate, seconds, sent, received, lost: sent - received, p50_ms: Number(q(0.5)), p99_ms: Number(q(0.99)),
  server_cpu_us_per_message: serverPid ? Number((cpuUsed * 1e6 / measuredSent).toFixed(2)) : null }));
for (const c of clients) c.sock.destroy();
