// The app's controller: routes between the landing page, the pre-join
// screen and the call, and wires signaling, media and peer links together.

import { SignalingClient, ROOM_PATTERN } from './signaling.js';
import { PeerLink } from './peer.js';
import { getDeviceTrack, getLocalMedia, getScreen } from './media.js';
import { CameraEffects } from './effects.js';
import { $, showView, setText, Grid, formatSize } from './ui.js';
import { ChatPanel, encodeChat } from './chat.js';
import { IncomingFile, MAX_FILE_BYTES, offerFile, showIncoming } from './files.js';
import { DevicePicker } from './devices.js';
import { describe, summarize } from './stats.js';
import { store, stored } from './storage.js';
import { Lobby } from './lobby.js';
import { forgetAbandoned } from './received.js';
import { MicLevel, MutedTalk, Speaking } from './speaking.js';
import { shares } from './bitrate.js';

const NAME_KEY = 'callisto.name';
// The server's access code, once one worked (for a server that needs one).
const ACCESS_KEY = 'callisto.access';

const call = {
  room: null,
  name: null,
  watching: false, // joined to watch: receive only, seen only by those taking part
  localStream: null,
  mediaMessage: null,
  joinNotice: null, // what the call's notice said on joining (about media)
  signaling: null,
  resume: null, // the token that takes our place back after a lost connection
  access: null, // the server's access code, if it needs one
  iceServers: [],
  links: new Map(),
  present: new Map(), // who the server says is in the room: id -> { id, name }
  audioOn: true,
  videoOn: true,
  hand: false, // our hand raised: shown on our tile, everywhere
  screen: null, // the shared screen's track, while sharing
  screenAudio: null, // and its sound, if the person shared it
  knocking: null, // the signaling of a join knocking on a locked room
  lockLost: false, // whether the last reconnection found our locked room unlocked
  leaving: false,
  joinClickedAt: 0,
  joinToFirstFrameMs: null,
};
const grid = new Grid($('grid'));
// Who speaks just now (speaking.js), sampled while in a call.
const speaking = { who: new Speaking(), mic: new MicLevel(), mutedTalk: new MutedTalk(), timer: null };
const chat = new ChatPanel(sendChat, sendFiles);
const effects = new CameraEffects();
const lobby = new Lobby({
  lock: (locked, openToAudience) => call.signaling?.lock(locked, openToAudience),
  admit: (id) => call.signaling?.admit(id),
  deny: (id) => call.signaling?.deny(id),
  announce: (text) => flash(text),
});
effects.addEventListener('failed', ({ detail }) => setText(call.signaling ? 'call-notice' : 'media-status', detail.message));
// eslint-disable-next-line no-new
new DevicePicker({
  devices: () => (call.localStream?.getTracks() ?? []).map((t) => effects.camera(t)),
  speaker: () => grid.sinkId,
  effect: () => effects.effect,
  useTrack,
  useEffect: chooseEffect,
  useSpeaker: (sinkId) => grid.setSink(sinkId),
  releaseMicrophone: () => speaking.mic.release(),
});

// A handle for tests and for curious people at the console.
window.__callisto = {
  get id() { return call.signaling?.id ?? null; },
  get links() { return call.links; },
  get joinToFirstFrameMs() { return call.joinToFirstFrameMs; },
  hold(on) { call.signaling?.hold(on); },
  /** The camera behind a sent track (with a video effect, the track is the effect's). */
  cameraOf: (track) => effects.camera(track),
};

route();
// Files received by pages since closed are still on disk: let them go.
forgetAbandoned();

function route() {
  const match = location.pathname.match(/^\/r\/([^/]+)\/?$/);
  if (!match) return showLanding();
  let room;
  try { room = decodeURIComponent(match[1]); } catch { room = ''; }
  if (!ROOM_PATTERN.test(room)) return showLanding(`“${room}” is not a valid room name.`);
  call.watching = new URLSearchParams(location.search).has('watch');
  showPrejoin(room);
}

/** The room's link: to take part, or with `watching`, to watch. */
function roomLink(watching) {
  return `${location.origin}/r/${call.room}${watching ? '?watch' : ''}`;
}

// ---- Landing -------------------------------------------------------------

function showLanding(error = null) {
  showView('landing');
  setText('room-error', error);
  $('room-input').focus();
  $('landing-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const room = $('room-input').value.trim();
    if (!ROOM_PATTERN.test(room)) {
      setText('room-error', 'Use 1–64 letters, digits, “-” or “_”.');
      $('room-input').focus();
      return;
    }
    location.assign(`/r/${room}`);
  });
  $('random-room').addEventListener('click', () => location.assign(`/r/${randomRoomName()}`));
}

function randomRoomName() {
  const words = ['amber', 'brisk', 'cedar', 'delta', 'ember', 'fjord', 'gala', 'harbor', 'iris', 'jade', 'koala', 'lumen', 'maple', 'nova', 'onyx', 'pine', 'quartz', 'raven', 'sierra', 'tulip'];
  const pick = () => words[crypto.getRandomValues(new Uint32Array(1))[0] % words.length];
  const digits = crypto.getRandomValues(new Uint32Array(1))[0] % 10000;
  return `${pick()}-${pick()}-${String(digits).padStart(4, '0')}`;
}

// ---- Pre-join ------------------------------------------------------------

async function showPrejoin(room) {
  call.room = room;
  document.title = `${room} · Callisto`;
  showView('prejoin');
  $('prejoin-room').textContent = room;
  $('name-input').value = stored(NAME_KEY) ?? '';
  $('name-input').focus();
  $('join-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    join();
  });
  $('knock-cancel').addEventListener('click', () => call.knocking?.cancelJoin());
  const roleLink = $('role-link');
  roleLink.href = roomLink(!call.watching);
  if (call.watching) {
    // Nothing is sent, so nothing asks for a camera or microphone.
    document.title = `Watch ${room} · Callisto`;
    $('prejoin-verb').textContent = 'Watch';
    $('join-btn').textContent = 'Watch';
    roleLink.textContent = 'Take part instead';
    $('watch-help').hidden = false;
    $('preview-box').hidden = true;
    $('prejoin-devices-btn').hidden = true;
    return;
  }
  const media = getLocalMedia();
  $('join-btn').disabled = true;
  const { stream, message } = await media;
  $('join-btn').disabled = false;
  // The preview shows the video effect chosen last time, as it will be sent.
  const camera = stream?.getVideoTracks()[0];
  const sent = camera && effects.wrap(camera);
  if (sent !== camera) {
    stream.removeTrack(camera);
    stream.addTrack(sent);
  }
  call.localStream = stream;
  call.mediaMessage = message;
  setText('media-status', message);
  showPreview();
}

/** Shows the camera in use (with its effect) in the pre-join preview, or says there is none. */
function showPreview() {
  const preview = $('preview');
  preview.srcObject = null; // the same stream may hold a new track
  preview.srcObject = call.localStream;
  $('preview-empty').hidden = Boolean(call.localStream?.getVideoTracks().length);
}

async function join() {
  const name = $('name-input').value.trim();
  if (name.length === 0 || [...name].length > 64) {
    setText('join-error', 'Enter a name of 1–64 characters.');
    $('name-input').focus();
    return;
  }
  setText('join-error', null);
  store(NAME_KEY, name);
  call.name = name;
  const typed = $('access-input').value.trim();
  call.access = typed || stored(ACCESS_KEY);
  call.joinClickedAt = performance.now();
  $('join-btn').disabled = true;
  try {
    await connectAndJoin();
  } catch (err) {
    showKnocking(null);
    $('join-btn').disabled = false;
    if (err.code === 'access-denied') return askForAccessCode(Boolean(typed));
    if (err.code === 'cancelled') return $('join-btn').focus();
    setText('join-error', joinErrorText(err));
    return;
  }
  showKnocking(null);
  if (call.access) store(ACCESS_KEY, call.access);
  enterCall();
}

/** Shows the access code field, saying what was wrong with the code given (if any). */
function askForAccessCode(typed) {
  if (!typed) store(ACCESS_KEY, null); // a remembered code no longer works
  $('access-field').hidden = false;
  setText('join-error', typed ? 'That access code is not right.' : 'This server needs an access code to join.');
  $('access-input').focus();
  $('access-input').select();
}

function joinErrorText(err) {
  switch (err.code) {
    case 'room-full': return 'This room is full. Try again later or pick another room.';
    case 'server-full': return 'The server has too many rooms open right now. Try again later.';
    case 'bad-name': return 'That name cannot be used: 1–64 characters, no control characters.';
    case 'access-denied': return 'The server no longer takes your access code.';
    case 'not-admitted': return 'Someone in the room turned you away. You can ask again.';
    default: return err.message || 'Could not join the room.';
  }
}

/**
 * Says that the join knocks on a locked room (with `signaling`, which can
 * stop it), or no longer does (null).
 */
function showKnocking(signaling) {
  call.knocking = signaling;
  const before = !$('prejoin').hidden;
  setText('knock-status', signaling && before ? 'This room is locked. Waiting for someone inside to let you in…' : null);
  $('knock-cancel').hidden = !(signaling && before);
  if (signaling && !before) setText('call-notice', 'The room was locked meanwhile: waiting for someone inside to let you back in…');
}

async function connectAndJoin() {
  const signaling = new SignalingClient();
  await signaling.connect();
  signaling.addEventListener('waiting', () => showKnocking(signaling));
  let welcome;
  try {
    welcome = await signaling.join(call.room, call.name, call.resume, call.access, call.watching);
  } catch (err) {
    signaling.close();
    throw err;
  }
  call.knocking = null;
  // Back under a new id, the place lost (a restart of the server): a lock
  // went with the old server. Locking again at once would make the others
  // coming back knock, so the person is told, and decides.
  call.lockLost = !call.watching && !welcome.resumed && call.links.size > 0 && lobby.locked && !welcome.locked;
  lobby.reset(welcome);
  call.signaling = signaling;
  call.resume = welcome.resume ?? null;
  call.iceServers = welcome.iceServers ?? [];
  call.present = new Map(welcome.peers.map((p) => [p.id, p]));
  signaling.addEventListener('peer-joined', ({ detail }) => {
    call.present.set(detail.peer.id, detail.peer);
    meet(detail.peer);
  });
  signaling.addEventListener('peer-left', ({ detail }) => {
    call.present.delete(detail.id);
    removeLink(detail.id);
  });
  signaling.addEventListener('signal', ({ detail }) => onSignal(detail.from, detail.data));
  signaling.addEventListener('broadcast', ({ detail }) => onState(detail.from, detail.data));
  // Renewed TURN credentials, before the last ones expire: for whoever
  // joins from now on, and for ICE restarts of the calls already up.
  signaling.addEventListener('ice-servers', ({ detail }) => {
    call.iceServers = detail.iceServers ?? [];
    for (const link of call.links.values()) link.setIceServers(call.iceServers);
  });
  signaling.addEventListener('locked', ({ detail }) => onLocked(detail));
  signaling.addEventListener('knock', ({ detail }) => lobby.knock(detail.peer));
  signaling.addEventListener('knock-ended', ({ detail }) => lobby.ended(detail.id));
  signaling.addEventListener('error', ({ detail }) => console.warn('signaling error', detail.code, detail.message));
  signaling.addEventListener('close', ({ detail }) => onSignalingClosed(detail));
  if (welcome.resumed) return resumeLinks(welcome.peers);
  if (call.links.size) return moveLinks(welcome.peers);
  for (const peer of welcome.peers) addLink(peer, true);
}

// How long a link to someone the server no longer lists waits for them to
// come back under a new id (they say so over the link: see moveLinks).
const MOVED_WAIT_MS = 20000;
// How long someone who just joined may take to say they are one of ours
// under a new id, before they are met as new.
const MEET_DELAY_MS = 1500;

/**
 * Back in the room under a new id, our place there lost: the server
 * restarted, or we were away past its grace. The calls went on peer to
 * peer, so each link is told our new id over its own data channel, end to
 * end (DTLS), which proves it is us. A peer that kept its end answers, and
 * the link stays, untouched: only the signaling under it changed. One that
 * let us go (it saw us leave) does not, and is met again as a newcomer
 * meets everyone. Links to peers not back in the room yet wait a while
 * for their own word.
 */
async function moveLinks(listed) {
  const id = call.signaling.id;
  const answers = await Promise.all([...call.links.values()].map(async (link) => [link, await link.sendMoved(id)]));
  if (call.signaling?.id !== id) return; // lost again meanwhile: the next welcome decides
  for (const [link, kept] of answers) if (!kept && call.links.get(link.id) === link) removeLink(link.id);
  let waiting = false;
  for (const link of call.links.values()) {
    link.setIceServers(call.iceServers);
    if (!call.present.has(link.id)) {
      awaitMove(link);
      waiting = true;
    }
  }
  // Those the welcome listed are met as a newcomer meets them; who joined
  // since offers to us (see meet), or says it moved. While links wait for
  // their peer's word, one of them may be theirs, on its way: a little
  // later, not to make a second connection to the same person.
  const meetListed = () => {
    if (call.signaling?.id !== id) return;
    for (const peer of listed) if (call.present.has(peer.id) && !call.links.has(peer.id)) addLink(call.present.get(peer.id), true);
  };
  if (waiting) setTimeout(meetListed, MEET_DELAY_MS);
  else meetListed();
}

/** Lets `link` go unless the server lists its peer (back under a new id) within MOVED_WAIT_MS. */
function awaitMove(link) {
  setTimeout(() => {
    if (call.links.get(link.id) === link && !call.present.has(link.id)) removeLink(link.id);
  }, MOVED_WAIT_MS);
}

/**
 * Someone joined: a link that waits for their offer (newcomers offer).
 * While some of our links wait for their peer to come back under a new
 * id, the newcomer may be one of them, saying so over the link in a
 * moment: they are met only if they do not (or, sooner, if they offer).
 */
function meet(peer) {
  const waiting = [...call.links.keys()].some((id) => !call.present.has(id));
  if (!waiting) return meetNow(peer);
  setTimeout(() => {
    if (call.present.has(peer.id) && !call.links.has(peer.id)) meetNow(peer);
  }, MEET_DELAY_MS);
}

/** A link to a newcomer, waiting for its offer, and our state for it. */
function meetNow(peer) {
  const link = addLink(peer, false);
  sendState(peer.id);
  return link;
}

/**
 * The peer of `link` is back with the server under `id`: the link goes by
 * it from now on. Only a peer the server no longer lists under its old id
 * can have moved: one still listed cannot take another's id (to have our
 * signaling for it sent there).
 */
function moved(link, id) {
  if (call.present.has(link.id)) return console.warn(`peer ${link.id} (${link.name}) says it moved to ${id}, but the server still lists it: ignored`);
  const taken = call.links.get(id);
  if (taken && taken !== link) return console.warn(`peer ${link.id} says it is now ${id}, which another link has`);
  const old = link.id;
  if (old !== id) {
    call.links.delete(old);
    link.id = id;
    call.links.set(id, link);
    grid.rename(old, id);
    grid.rename(screenTile(old), screenTile(id));
    speaking.who.forget(old);
    const sample = stats.samples.get(old);
    stats.samples.delete(old);
    if (sample) stats.samples.set(id, sample);
    chat.renamePerson(old, id);
    updateCount();
  }
  link.ackMoved(id);
}

/**
 * Back in our place after a lost connection, with the same id: the calls
 * went on peer to peer, so their links stay. Those to peers who left
 * meanwhile go; those who came meanwhile get a link that waits for their
 * offer (newcomers offer), which the server kept for us, or asks for it
 * again if it went to the old connection before the server noticed it was
 * lost. Signals lost with the old connection can leave a link
 * half-negotiated: one not connected restarts ICE.
 */
function resumeLinks(peers) {
  const here = new Set(peers.map((p) => p.id));
  for (const id of [...call.links.keys()]) if (!here.has(id)) removeLink(id);
  // The welcome's credentials are the freshest, and the next renewal is
  // half their lifetime away: the links take them now.
  for (const link of call.links.values()) link.setIceServers(call.iceServers);
  const stalled = [...call.links.values()].filter((l) => l.pc.connectionState !== 'connected');
  for (const peer of peers) if (!call.links.has(peer.id)) addLink(peer, false).expectOffer();
  for (const link of stalled) link.renegotiate();
}

// ---- In the call ---------------------------------------------------------

function enterCall() {
  $('preview').srcObject = null;
  showView('call');
  speaking.timer ??= setInterval(showSpeaking, 150);
  $('call-room').textContent = call.room;
  const receiveOnly = !call.localStream;
  if (call.watching) {
    call.joinNotice = 'You are watching: those taking part do not see or hear you.';
    for (const id of ['mute-btn', 'camera-btn', 'screen-btn', 'hand-btn', 'devices-btn', 'lock-btn', 'copy-watch-btn']) $(id).hidden = true;
    $('take-part-btn').hidden = false;
    chat.note('You are watching: your messages and files reach those taking part, not the rest of the audience.');
  } else {
    call.joinNotice = receiveOnly ? `You joined receive-only. ${call.mediaMessage ?? ''}`.trim() : call.mediaMessage;
    grid.tile('local', { name: call.name, local: true });
    if (call.localStream) grid.attach('local', call.localStream);
  }
  setText('call-notice', call.joinNotice);
  setupControls();
  updateCount();
  sendState();
  window.addEventListener('pagehide', () => {
    call.leaving = true;
    call.signaling?.leave();
    call.signaling?.close();
  });
}

// The mute and camera buttons. Without a microphone or camera in use
// (joined without, or refused at first) they read "Unmute" and "Camera
// on", and start one.
const TOGGLES = {
  audio: { button: 'mute-btn', on: 'audioOn', labels: { on: 'Mute', off: 'Unmute' }, none: 'No microphone in use yet: starts one' },
  video: { button: 'camera-btn', on: 'videoOn', labels: { on: 'Camera off', off: 'Camera on' }, none: 'No camera in use yet: starts one' },
};

function setupControls() {
  for (const [kind, toggle] of Object.entries(TOGGLES)) {
    call[toggle.on] = Boolean(localTrack(kind));
    $(toggle.button).addEventListener('click', () => toggleMedia(kind));
  }
  showToggles();
  const screen = $('screen-btn');
  if (!navigator.mediaDevices?.getDisplayMedia) {
    screen.disabled = true;
    screen.title = 'This browser cannot share a screen here';
  }
  screen.addEventListener('click', () => (call.screen ? stopSharing() : shareScreen()));
  $('hand-btn').addEventListener('click', () => {
    call.hand = !call.hand;
    $('hand-btn').textContent = call.hand ? 'Lower hand' : 'Raise hand';
    $('hand-btn').setAttribute('aria-pressed', String(call.hand));
    grid.setHand('local', call.hand);
    sendState();
  });
  $('stats-btn').addEventListener('click', () => showStats(!stats.timer));
  $('copy-btn').addEventListener('click', () => copyLink(roomLink(call.watching)));
  $('copy-watch-btn').addEventListener('click', () => copyLink(roomLink(true)));
  $('leave-btn').addEventListener('click', () => leave('You can rejoin whenever you like.'));
  // From the audience to the pre-join screen, with camera and microphone.
  $('take-part-btn').addEventListener('click', () => {
    leave('Taking part…');
    location.assign(roomLink(false));
  });
  $('rejoin-btn').addEventListener('click', () => location.assign(roomLink(call.watching)));
}

async function copyLink(link) {
  try {
    await navigator.clipboard.writeText(link);
    flash(`Link copied: ${link}`);
  } catch {
    flash(`Copy this link: ${link}`);
  }
}

// Live stats on every remote tile, once a second while they are on.
const stats = { timer: null, samples: new Map() };

function showStats(on) {
  const button = $('stats-btn');
  button.setAttribute('aria-pressed', String(on));
  clearInterval(stats.timer);
  stats.timer = null;
  stats.samples.clear();
  if (!on) {
    for (const id of call.links.keys()) grid.setStats(id, null);
    return;
  }
  const tick = async () => {
    for (const [id, link] of call.links) {
      try {
        const report = await link.pc.getStats();
        if (!stats.timer) return; // turned off meanwhile
        const summary = summarize(report.values(), stats.samples.get(id) ?? null, link.cameraMid);
        stats.samples.set(id, summary.sample);
        grid.setStats(id, describe(summary));
      } catch (err) {
        // A connection closed between the loop and getStats: its tile is gone.
        if (call.links.has(id)) console.warn(`peer ${id}: no stats`, err);
      }
    }
  };
  stats.timer = setInterval(tick, 1000);
  tick();
}

function localTrack(kind) {
  return call.localStream?.getTracks().find((t) => t.kind === kind) ?? null;
}

/** Mutes or unmutes, turns the camera off or on; starts one if there is none. */
async function toggleMedia(kind) {
  const { button, on } = TOGGLES[kind];
  if (!localTrack(kind)) {
    $(button).disabled = true;
    const { track, message } = await getDeviceTrack(kind);
    $(button).disabled = false;
    if (message) return flash(message);
    return useTrack(track);
  }
  call[on] = !call[on];
  for (const t of call.localStream.getTracks()) if (t.kind === kind) effects.setEnabled(t, call[on]);
  showToggles();
  sendState();
}

/** Marks the tiles of those who speak just now, ours too; tells us if we talk muted. */
function showSpeaking() {
  const now = performance.now();
  const levels = [];
  if (!call.watching) {
    const level = speaking.mic.level(localTrack('audio'));
    levels.push(['local', call.audioOn ? level : 0]);
    if (call.audioOn) speaking.mutedTalk.reset();
    else if (speaking.mutedTalk.update(level, now)) flash('You are muted: unmute to be heard.');
  }
  for (const link of call.links.values()) if (!link.watching) levels.push([link.id, link.micLevel]);
  for (const [id, level] of levels) {
    const on = speaking.who.update(id, level, now);
    if (on !== undefined) grid.setSpeaking(id, on);
  }
}

function showToggles() {
  for (const [kind, { button, on, labels, none }] of Object.entries(TOGGLES)) {
    const el = $(button);
    el.textContent = call[on] ? labels.on : labels.off;
    el.setAttribute('aria-pressed', String(!call[on]));
    el.title = localTrack(kind) ? '' : none;
  }
  grid.setMediaState('local', { audio: call.audioOn, video: call.videoOn });
}

/**
 * Puts a newly chosen microphone or camera in use: in place of the old
 * one in our stream and every connection, muted or off if the old one was;
 * or, if there was none, on, sent to everyone from now on. The connections
 * negotiated audio and video to send from the start (peer.js), so either
 * way no renegotiation is needed.
 */
async function useTrack(track) {
  if (call.leaving) return track.stop();
  await sendInstead(localTrack(track.kind), effects.wrap(track));
}

/** Chooses a video effect: for the camera in use, if any, and the next ones. */
async function chooseEffect(id) {
  const old = localTrack('video');
  const next = effects.choose(id, old);
  if (next !== old && !call.leaving) await sendInstead(old, next);
}

/** Sends `track` in place of `old` (null: in addition to what is sent). */
async function sendInstead(old, track) {
  if (!call.localStream) {
    call.localStream = new MediaStream();
    for (const link of call.links.values()) link.localStream = call.localStream;
  }
  const stream = call.localStream;
  const { on } = TOGGLES[track.kind];
  if (!old) call[on] = true;
  effects.setEnabled(track, call[on]);
  if (old) stream.removeTrack(old);
  stream.addTrack(track);
  await Promise.all([...call.links.values()].map((link) => link.useLocalTrack(track)));
  effects.release(old, track);
  if (track.kind === 'video' || !old) {
    grid.attach('local', null); // the same stream, with a new track in it
    grid.attach('local', stream);
  }
  const beforeJoining = !$('prejoin').hidden;
  if (beforeJoining) showPreview();
  if (old) return;
  if (beforeJoining && call.mediaMessage) {
    call.mediaMessage = null;
    setText('media-status', null);
  }
  if ($('call-notice').textContent === call.joinNotice) setText('call-notice', null);
  showToggles();
  sendState();
}

/**
 * Sends a screen beside the camera to everyone, new peers included, until
 * the person stops it here or in the browser's own sharing bar. It shows
 * in a tile of its own, here and at each peer; its sound, if shared, plays
 * there at the peers (not here: the person hears it already).
 */
async function shareScreen() {
  const button = $('screen-btn');
  button.disabled = true;
  const result = await getScreen();
  button.disabled = false;
  if (!result) return; // cancelled in the picker
  if (result.message) return flash(result.message);
  if (call.leaving) {
    result.track.stop();
    return result.audio?.stop();
  }
  call.screen = result.track;
  call.screenAudio = result.audio;
  result.track.addEventListener('ended', () => stopSharing());
  for (const link of call.links.values()) link.sendScreen(call.screen, call.screenAudio);
  grid.tile(SCREEN_TILE, { name: call.name, local: true, screen: true, beside: 'local' });
  grid.attach(SCREEN_TILE, new MediaStream([call.screen]));
  button.textContent = 'Stop sharing';
  button.setAttribute('aria-pressed', 'true');
  sendState();
}

function stopSharing() {
  if (!call.screen) return;
  call.screen.stop();
  call.screenAudio?.stop();
  call.screen = null;
  call.screenAudio = null;
  for (const link of call.links.values()) link.sendScreen(null);
  grid.remove(SCREEN_TILE);
  const button = $('screen-btn');
  button.textContent = 'Share screen';
  button.setAttribute('aria-pressed', 'false');
  sendState();
}

function flash(text) {
  setText('call-notice', text);
  setTimeout(() => {
    if ($('call-notice').textContent === text) setText('call-notice', null);
  }, 4000);
}

function leave(reason) {
  call.leaving = true;
  call.signaling?.leave();
  call.signaling?.close();
  for (const id of [...call.links.keys()]) removeLink(id);
  grid.clear();
  call.screen?.stop();
  call.screenAudio?.stop();
  call.screen = null;
  call.screenAudio = null;
  if (stats.timer) showStats(false);
  clearInterval(speaking.timer);
  speaking.timer = null;
  speaking.mic.close();
  speaking.who.forget('local');
  for (const track of call.localStream?.getTracks() ?? []) effects.release(track);
  call.localStream = null;
  showView('left');
  $('left-reason').textContent = reason;
  $('rejoin-btn').focus();
}

function addLink(peer, initiator) {
  if (call.links.has(peer.id)) return call.links.get(peer.id);
  const link = new PeerLink({
    id: peer.id,
    name: peer.name,
    polite: call.signaling.id > peer.id,
    iceServers: call.iceServers,
    localStream: call.localStream,
    // By the link's id, which changes if the peer comes back under a new one.
    send: (data) => call.signaling?.signal(link.id, data),
    // The server never lists one who watches to another (docs/protocol.md).
    direction: call.watching ? 'recvonly' : peer.watching ? 'sendonly' : 'sendrecv',
  });
  // Someone watching has no tile: they are counted (updateCount).
  link.watching = Boolean(peer.watching);
  if (call.screen) link.sendScreen(call.screen, call.screenAudio);
  call.links.set(peer.id, link);
  if (!link.watching) grid.tile(peer.id, { name: peer.name });
  link.addEventListener('track', ({ detail }) => {
    if (detail.screen) return grid.attach(screenTile(link.id), link.screenStream);
    grid.attach(link.id, link.remoteStream);
    if (detail.track.kind === 'video') measureFirstFrame(link.id);
  });
  link.addEventListener('state', ({ detail }) => grid.setConnectionState(link.id, detail.state));
  link.addEventListener('chat', ({ detail }) => chat.add(link.name, detail.text, { privately: detail.private }));
  link.addEventListener('moved', ({ detail }) => moved(link, detail.id));
  link.addEventListener('file', ({ detail }) => {
    const incoming = new IncomingFile(detail.channel, `${link.id} (${link.name})`);
    incoming.addEventListener('offer', () => {
      showIncoming(chat.entry(link.name, { privately: incoming.offer.private, summary: `offers a file, ${incoming.offer.name}` }), incoming);
    }, { once: true });
  });
  if (initiator) link.start();
  updateCount();
  return link;
}

function removeLink(id) {
  stats.samples.delete(id);
  speaking.who.forget(id);
  call.links.get(id)?.close();
  call.links.delete(id);
  grid.remove(id);
  grid.remove(screenTile(id));
  updateCount();
}

function onSignal(from, data) {
  if (data?.state) return onState(from, data);
  // Someone in the room offering before we met them (see meet) is new.
  const link = call.links.get(from) ?? (call.present.has(from) ? meetNow(call.present.get(from)) : null);
  if (!link) return console.warn('signal from an unknown peer', from);
  link.handleSignal(data).catch((err) => console.warn(`peer ${from}: signal failed`, err));
}

function onState(from, data) {
  if (!data?.state) return;
  const link = call.links.get(from);
  // One who watches sends nothing, so has nothing to show (and no tile).
  if (link?.watching) return;
  grid.setMediaState(from, data.state);
  // A hand just raised is said (to screen readers too); lowered, it goes quietly.
  if (grid.setHand(from, data.state.hand === true) && data.state.hand === true && link) flash(`${link.name} raised their hand.`);
  if (data.state.screen === true && link) {
    const started = !grid.has(screenTile(from));
    grid.tile(screenTile(from), { name: link.name, screen: true, beside: from });
    grid.attach(screenTile(from), link.screenStream);
    // A screen just shared is what everyone wants to see: shown large,
    // unless another tile is pinned.
    if (started && grid.pinned === null) grid.pin(screenTile(from));
  } else {
    grid.remove(screenTile(from));
  }
}

/** The room was locked or unlocked, by us or someone else. */
function onLocked({ locked, by, openToAudience = false }) {
  lobby.setLocked(locked, openToAudience);
  const who = by === call.signaling?.id ? 'You' : call.links.get(by)?.name ?? 'Someone';
  if (!locked) return flash(`${who} unlocked the room: anyone with the link can join.`);
  if (openToAudience) return flash(`${who} opened the locked room to its audience: who comes to watch comes in; who would take part waits until someone here lets them in.`);
  flash(`${who} locked the room: newcomers wait until someone here lets them in.`);
}

// The tiles of shared screens: ours, and each peer's beside its camera's.
const screenTile = (peerId) => `${peerId}/screen`;
const SCREEN_TILE = screenTile('local');

function sendState(to = null) {
  if (call.watching) return; // nothing to tell: nothing is sent
  const data = { state: { audio: call.audioOn, video: call.videoOn, screen: Boolean(call.screen), hand: call.hand } };
  if (to) call.signaling?.signal(to, data);
  else call.signaling?.broadcast(data);
}

/**
 * The links a message or file goes to: every one for everyone (`to`
 * null), or the one of peer `to`, or null (with a note in the chat saying
 * why) if that peer has left.
 */
function recipients(to, what) {
  if (!to) return [...call.links.values()];
  const link = call.links.get(to);
  if (!link) chat.note(`Not sent: the person you chose in “To” has left the call. Choose someone else for ${what}.`);
  return link ? [link] : null;
}

/**
 * Sends a chat message to everyone in the call, or privately to one
 * person (`to`, a peer's id), peer to peer: to each link whose channel is
 * open, or as soon as it opens. There is no history: who joins later sees
 * what is written from then on.
 */
function sendChat(text, to) {
  const links = recipients(to, 'this message');
  if (!links) return false;
  const wire = encodeChat(text, { private: Boolean(to) });
  chat.add(call.name, text, { mine: true, to: to && links[0].name });
  if (links.length === 0) return chat.note('Nobody else is here yet: nobody got that message.');
  const missed = links.filter((link) => !link.sendChat(wire)).map((link) => link.name);
  if (missed.length) chat.note(`Not delivered to ${missed.join(', ')}: no connection.`);
}

/** Offers each file to everyone in the call, or to one person, as chat does messages. */
function sendFiles(files, to) {
  for (const file of files) {
    if (file.size > MAX_FILE_BYTES) {
      chat.note(`Not sent: ${file.name} is larger than ${formatSize(MAX_FILE_BYTES)}.`);
      continue;
    }
    const links = recipients(to, file.name);
    if (!links) continue;
    if (links.length === 0) {
      chat.note(`Nobody else is here yet: nobody got ${file.name}.`);
      continue;
    }
    offerFile(chat.entry(call.name, { mine: true, to: to && links[0].name }), file, links, { private: Boolean(to) });
  }
}

/** Updates the count of people, and the chat's list of whom to write to. */
function updateCount() {
  const links = [...call.links.values()];
  // Everyone we send to shares our uplink (bitrate.js).
  const caps = shares(links.length);
  for (const link of links) link.setCaps(caps);
  chat.setPeople(links.map(({ id, name, watching }) => ({ id, name: watching ? `${name} (watching)` : name })));
  const audience = links.filter((l) => l.watching).length;
  const taking = links.length - audience;
  if (call.watching) {
    $('call-count').textContent = taking === 0 ? 'Watching · nobody is taking part yet' : `Watching · ${taking} taking part`;
    return;
  }
  const n = taking + 1;
  const here = n === 1 ? 'Only you so far' : `${n} people`;
  $('call-count').textContent = audience ? `${here} · ${audience} watching` : here;
}


function measureFirstFrame(peerId) {
  if (call.joinToFirstFrameMs !== null) return;
  const video = document.querySelector(`.tile[data-peer-id="${CSS.escape(peerId)}"] video`);
  video?.requestVideoFrameCallback?.(() => {
    call.joinToFirstFrameMs ??= Math.round(performance.now() - call.joinClickedAt);
  });
}

async function onSignalingClosed({ code, reason }) {
  if (call.leaving) return;
  // The links stay: media flows peer to peer, and the server keeps our
  // place for a while (docs/protocol.md, "Resuming"). They go if it did not.
  call.signaling = null;
  // Who is in the room is the server's word, and we have none now: a peer
  // may tell us it moved (see moved) until the next welcome says.
  call.present = new Map();
  const why = reason ? ` (${reason})` : code === 1006 ? ' (network)' : '';
  for (let attempt = 0; !call.leaving; attempt++) {
    setText('call-notice', `Lost the connection to the server${why}. Reconnecting…`);
    // Every 2 s at most while the server may still keep our place (15 s
    // by default), then backing off to every 10 s.
    await new Promise((r) => setTimeout(r, Math.min(attempt < 8 ? 2000 : 10000, 500 * 2 ** attempt)));
    try {
      await connectAndJoin();
      setText('call-notice', call.lockLost ? 'Reconnected. The server restarted, and the room is no longer locked: lock it again once everyone is back.' : 'Reconnected.');
      sendState();
      return;
    } catch (err) {
      if (err.code === 'access-denied') store(ACCESS_KEY, null);
      if (['room-full', 'server-full', 'access-denied', 'not-admitted'].includes(err.code)) return leave(joinErrorText(err));
    }
  }
}
