// How much video each connection may carry from us. Calls are full mesh:
// our camera is encoded and sent once per person, each connection
// estimating the network for itself, unaware of the others. Left alone,
// five connections each aim at what one would, and together they
// overfill the uplink (delay, loss, and a CPU busy with large frames).
// So each connection gets a share of one budget for the camera, and one
// for the screen, as RTCRtpSender maxBitrate; under it, the browser
// lowers resolution or frame rate itself.

/** What our camera may take of the uplink in all, bits/s. */
export const CAMERA_BUDGET = 2_500_000;
/** What a shared screen may take in all: its detail needs more. */
export const SCREEN_BUDGET = 4_000_000;
/** Below this, video is no longer worth watching: the floor of a share. */
export const CAMERA_FLOOR = 150_000;
export const SCREEN_FLOOR = 300_000;

/**
 * The most each of `receivers` connections may carry of our camera and of
 * our screen, bits/s.
 */
export function shares(receivers) {
  const n = Math.max(1, receivers);
  return {
    camera: Math.max(CAMERA_FLOOR, Math.floor(CAMERA_BUDGET / n)),
    screen: Math.max(SCREEN_FLOOR, Math.floor(SCREEN_BUDGET / n)),
  };
}

/**
 * Caps what `sender` sends at `bps` (null: no cap). Its parameters exist
 * once negotiated: before, this does nothing (call again then).
 */
export async function capSender(sender, bps) {
  if (!sender) return;
  const params = sender.getParameters();
  const encoding = params.encodings?.[0];
  if (!encoding || (encoding.maxBitrate ?? null) === bps) return;
  if (bps === null) delete encoding.maxBitrate;
  else encoding.maxBitrate = bps;
  await sender.setParameters(params);
}
