// Live connection stats: what getStats() says about one peer connection,
// boiled down to what a person can act on (is it direct or relayed, how
// long a round trip, how much comes in and goes out, what is lost, the
// camera's and a shared screen's picture), and
// the lines a tile shows. The summary is a pure function of two samples,
// so it is tested without a browser (tests/app/stats.test.js).

/** A number getStats gave, or null when it gave none or nonsense. */
function num(v) {
  return typeof v === 'number' && Number.isFinite(v) && v >= 0 ? v : null;
}

/**
 * Summarizes one getStats() report, with the previous sample's counters
 * for the rates (null at first).
 * @param {Iterable<object>} report the RTCStatsReport's values
 * @param {{ timestamp: number, bytesIn: number, bytesOut: number } | null} previous
 * @param {string|null} videoMid the camera's video among several (a shared
 *   screen's is another, described as `screen`); null: any
 */
export function summarize(report, previous = null, videoMid = null) {
  const byId = new Map();
  for (const s of report) if (s && typeof s.id === 'string') byId.set(s.id, s);
  let pair = null;
  let bytesIn = 0;
  let bytesOut = 0;
  let packetsIn = 0;
  let lost = 0;
  let video = null;
  let screen = null;
  let timestamp = null;
  for (const s of byId.values()) {
    const at = num(s.timestamp);
    if (at !== null && (timestamp === null || at > timestamp)) timestamp = at;
    if (s.type === 'transport' && typeof s.selectedCandidatePairId === 'string') pair = byId.get(s.selectedCandidatePairId) ?? pair;
    if (s.type === 'inbound-rtp') {
      bytesIn += num(s.bytesReceived) ?? 0;
      packetsIn += num(s.packetsReceived) ?? 0;
      // packetsLost may go negative with duplicates; it counts as none.
      lost += num(s.packetsLost) ?? 0;
      if (s.kind === 'video' && num(s.frameWidth)) {
        const picture = { width: num(s.frameWidth), height: num(s.frameHeight), fps: num(s.framesPerSecond) };
        if (videoMid === null || s.mid === videoMid) video = picture;
        else screen = picture;
      }
    }
    if (s.type === 'outbound-rtp') bytesOut += num(s.bytesSent) ?? 0;
  }
  // Without a transport entry (older browsers), the nominated pair.
  if (!pair) for (const s of byId.values()) if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s;
  const local = pair ? byId.get(pair.localCandidateId) : null;
  const elapsed = previous && timestamp !== null ? timestamp - previous.timestamp : 0;
  const finite = (v) => (Number.isFinite(v) ? v : null);
  const rate = (now, before) => (elapsed > 0 && now >= before ? finite(Math.round(((now - before) * 8) / elapsed)) : null);
  return {
    path: local ? pathOf(local) : null,
    rttMs: num(pair?.currentRoundTripTime) === null ? null : finite(Math.round(pair.currentRoundTripTime * 1000)),
    inKbps: previous ? rate(bytesIn, previous.bytesIn) : null,
    outKbps: previous ? rate(bytesOut, previous.bytesOut) : null,
    lossPercent: packetsIn + lost > 0 ? finite((lost / (packetsIn + lost)) * 100) : null,
    video,
    screen,
    sample: { timestamp: timestamp ?? 0, bytesIn, bytesOut },
  };
}

function pathOf(candidate) {
  const protocol = String(candidate.protocol ?? '').toUpperCase() || '?';
  switch (candidate.candidateType) {
    case 'relay': return { kind: 'relayed', text: `relayed (TURN over ${String(candidate.relayProtocol ?? candidate.protocol ?? '?').toUpperCase()})` };
    case 'srflx':
    case 'prflx': return { kind: 'direct', text: `direct, through NAT (${protocol})` };
    case 'host': return { kind: 'direct', text: `direct (${protocol})` };
    default: return { kind: 'unknown', text: 'unknown' };
  }
}

const kbps = (n) => `${n.toLocaleString('en')} kbit/s`;

/** The lines a tile shows for a summary. */
export function describe(s) {
  const lines = [];
  lines.push(['Path', s.path?.text ?? 'not connected']);
  if (s.rttMs !== null) lines.push(['Round trip', `${s.rttMs} ms`]);
  const picture = (p) => `${p.width}×${p.height}${p.fps !== null ? `, ${Math.round(p.fps)} fps` : ''}`;
  const video = s.video ? picture(s.video) : null;
  // The rate is the whole connection's: camera, microphone and screen.
  if (s.inKbps !== null || video) lines.push(['Receiving', [video, s.inKbps !== null ? kbps(s.inKbps) : null].filter(Boolean).join(', ')]);
  if (s.screen) lines.push(['Screen', picture(s.screen)]);
  if (s.outKbps !== null) lines.push(['Sending', kbps(s.outKbps)]);
  if (s.lossPercent !== null) lines.push(['Lost', `${s.lossPercent.toFixed(1)} %`]);
  return lines;
}
