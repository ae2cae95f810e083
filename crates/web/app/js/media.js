// Local media: camera and microphone capture with sensible constraints, the
// screen for sharing, and a message a person can act on when capture is
// impossible.

import { store, stored } from './storage.js';

const VIDEO = { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } };

// The microphone's processing in the browser, each on by default: echo
// cancellation (needed without headphones), noise suppression and
// automatic gain. Music wants them off. The choice is kept in this
// browser for the next calls.
export const PROCESSING = ['echoCancellation', 'noiseSuppression', 'autoGainControl'];
const PROCESSING_KEY = 'callisto.audioProcessing';

/** The processing chosen for the microphone: { echoCancellation: bool, ... }. */
export function audioProcessing() {
  let saved = {};
  try {
    saved = JSON.parse(stored(PROCESSING_KEY) ?? '{}') ?? {};
  } catch { /* not ours: the defaults */ }
  return Object.fromEntries(PROCESSING.map((k) => [k, typeof saved[k] === 'boolean' ? saved[k] : true]));
}

/** Keeps `processing` (as audioProcessing returns it) for this and later calls. */
export function setAudioProcessing(processing) {
  store(PROCESSING_KEY, JSON.stringify(processing));
}

/**
 * Asks for camera and microphone. Falls back to whichever one exists.
 * Resolves to { stream, message }: stream is null when nothing could be
 * captured, and message says why (null when everything worked).
 */
export async function getLocalMedia() {
  if (!navigator.mediaDevices?.getUserMedia) {
    return { stream: null, message: 'This page cannot use a camera or microphone here: open it over https:// or on localhost. You can still join to watch and listen.' };
  }
  const audio = audioProcessing();
  try {
    return { stream: await navigator.mediaDevices.getUserMedia({ audio, video: VIDEO }), message: null };
  } catch (err) {
    if (err.name === 'NotFoundError' || err.name === 'OverconstrainedError' || err.name === 'NotReadableError') {
      // One of the two may still work on its own.
      for (const [constraints, missing] of [[{ audio }, 'camera'], [{ video: VIDEO }, 'microphone']]) {
        try {
          const stream = await navigator.mediaDevices.getUserMedia(constraints);
          return { stream, message: `No ${missing} available (${describe(err)}). Joining with what works.` };
        } catch { /* try the next */ }
      }
    }
    return { stream: null, message: `${describe(err)} You can still join to watch and listen, and turn them on in the call.` };
  }
}

/** The devices of each kind; labels are known once capture was allowed. */
export async function listDevices() {
  const all = (await navigator.mediaDevices?.enumerateDevices?.()) ?? [];
  const of = (kind) => all.filter((d) => d.kind === kind && d.deviceId);
  return { audioinput: of('audioinput'), videoinput: of('videoinput'), audiooutput: of('audiooutput') };
}

/**
 * A new track from one microphone or camera (the default one without
 * `deviceId`), with the call's constraints and the processing chosen. Resolves to { track } or
 * { message } saying why not.
 * @param {'audio'|'video'} kind
 * @param {string} [deviceId]
 */
export async function getDeviceTrack(kind, deviceId) {
  if (!navigator.mediaDevices?.getUserMedia) {
    return { message: 'This page cannot use a camera or microphone here: open it over https:// or on localhost.' };
  }
  const device = deviceId ? { deviceId: { exact: deviceId } } : {};
  const constraints = kind === 'audio' ? { audio: { ...audioProcessing(), ...device } } : { video: { ...VIDEO, ...device } };
  try {
    const stream = await navigator.mediaDevices.getUserMedia(constraints);
    return { track: stream.getTracks()[0] };
  } catch (err) {
    return { message: describe(err) };
  }
}

function describe(err) {
  switch (err.name) {
    case 'NotAllowedError':
    case 'SecurityError':
      return 'Camera and microphone permission was denied. To use them, allow them in the browser\'s site settings.';
    case 'NotFoundError':
      return 'No camera or microphone was found.';
    case 'NotReadableError':
      return 'The camera or microphone is in use by another program.';
    case 'OverconstrainedError':
      return 'The camera cannot provide the requested format.';
    default:
      return `The camera and microphone could not be started (${err.name}).`;
  }
}

// Text and slides matter more than motion in a shared screen: Chromium
// keeps the resolution and drops frames when bandwidth is short.
const SCREEN = { frameRate: { ideal: 15, max: 30 } };
// A shared tab's or screen's sound (a video playing in it), if the person
// ticks it in the browser's picker: left as it is, without the processing
// meant for a voice (echo cancellation would take music apart).
const SCREEN_AUDIO = { echoCancellation: false, noiseSuppression: false, autoGainControl: false };

/**
 * Asks which screen, window or tab to share. Resolves to { track, audio }
 * (its video, and its sound or null), or { message } saying why not; null
 * if the person cancelled.
 */
export async function getScreen() {
  if (!navigator.mediaDevices?.getDisplayMedia) {
    return { message: 'This browser cannot share a screen here (it needs https:// or localhost, and a desktop browser).' };
  }
  try {
    const stream = await navigator.mediaDevices.getDisplayMedia({ video: SCREEN, audio: SCREEN_AUDIO });
    const [track] = stream.getVideoTracks();
    track.contentHint = 'detail';
    const [audio = null] = stream.getAudioTracks();
    if (audio) audio.contentHint = 'music';
    return { track, audio };
  } catch (err) {
    // Chromium says NotAllowedError both when the person cancels the
    // picker and when a policy forbids it; only the second needs words.
    if (err.name === 'NotAllowedError' && !/system|policy/i.test(err.message)) return null;
    return { message: `The screen could not be shared (${err.name}: ${err.message}).` };
  }
}
