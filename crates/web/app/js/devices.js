// Device choice before and during a call: which microphone, camera and
// speaker to use, in a dialog. A new microphone or camera replaces the old
// one's track in every connection (or, in a call joined without one,
// starts being sent), with no renegotiation and no gap in the call; a new
// speaker plays every remote tile. The microphone's processing (echo cancellation, noise
// suppression, automatic gain) is chosen here too: the microphone in use
// is opened again with it, as browsers do not change it on a live track.
// So is the camera's video effect (effects.js).

import { $, setText } from './ui.js';
import { PROCESSING, audioProcessing, getDeviceTrack, listDevices, setAudioProcessing } from './media.js';
import { EFFECTS, canApplyEffects } from './effects.js';

const KINDS = [
  { select: 'mic-select', devices: 'audioinput', kind: 'audio' },
  { select: 'camera-select', devices: 'videoinput', kind: 'video' },
];

export class DevicePicker {
  /**
   * @param {object} o
   * @param {() => MediaStreamTrack[]} o.devices the microphone and camera in use (their own tracks)
   * @param {() => string|null} o.speaker the speaker in use (null: the default)
   * @param {() => string} o.effect the video effect chosen
   * @param {(track: MediaStreamTrack) => Promise<void>} o.useTrack puts a new track in use
   * @param {(id: string) => Promise<void>} o.useEffect chooses a video effect
   * @param {(deviceId: string) => Promise<void>} o.useSpeaker plays remote audio there
   * @param {() => void} [o.releaseMicrophone] lets go of what else holds the
   *   microphone open (a level meter's copy of its track), before it is
   *   opened again with other processing
   */
  constructor({ devices, speaker, effect, useTrack, useEffect, useSpeaker, releaseMicrophone = () => {} }) {
    this.dialog = $('devices');
    this.releaseMicrophone = releaseMicrophone;
    this.inUse = (kind) => devices().find((t) => t.kind === kind) ?? null;
    this.effect = effect;
    this.speakerInUse = speaker;
    this.speaker = $('speaker-select');
    // setSinkId is not everywhere (Firefox asks first, Safari lacks it).
    this.canChooseSpeaker = 'setSinkId' in HTMLMediaElement.prototype;
    $('speaker-field').hidden = !this.canChooseSpeaker;
    // From the call's controls, and from the pre-join screen (to choose
    // before anyone sees or hears anything).
    for (const opener of ['devices-btn', 'prejoin-devices-btn']) $(opener).addEventListener('click', () => this.open());
    navigator.mediaDevices?.addEventListener?.('devicechange', () => {
      if (this.dialog.open) this.#fill();
    });
    for (const { select, kind } of KINDS) {
      $(select).addEventListener('change', async (ev) => {
        const picked = ev.target.value;
        if (!picked) return; // "None in use": turning one off is the call's buttons' job
        this.#error(null);
        ev.target.disabled = true;
        const { track, message } = await getDeviceTrack(kind, picked);
        ev.target.disabled = false;
        if (message) {
          this.#error(message);
          return this.#fill(); // back to what is in use
        }
        await useTrack(track);
      });
    }
    for (const key of PROCESSING) {
      $(`${key}-box`).addEventListener('change', () => this.#process(useTrack));
    }
    const effectSelect = $('effect-select');
    for (const { id, label } of EFFECTS) effectSelect.append(new Option(label, id));
    effectSelect.disabled = !canApplyEffects;
    $('effect-help').hidden = canApplyEffects;
    effectSelect.addEventListener('change', async () => {
      this.#error(null);
      effectSelect.disabled = true;
      await useEffect(effectSelect.value);
      effectSelect.disabled = false;
    });
    this.speaker.addEventListener('change', async () => {
      this.#error(null);
      try {
        await useSpeaker(this.speaker.value);
      } catch (err) {
        this.#error(`That speaker cannot be used (${err.name}).`);
      }
    });
  }

  async open() {
    this.#error(null);
    await this.#fill();
    this.dialog.showModal();
    // The first choice that can be made, for keyboard use.
    this.dialog.querySelector('select:not(:disabled)')?.focus();
  }

  /**
   * Takes the processing ticked in the dialog: kept for later calls, and
   * applied now to the microphone in use by opening it again with it.
   */
  async #process(useTrack) {
    const before = audioProcessing();
    setAudioProcessing(Object.fromEntries(PROCESSING.map((k) => [k, $(`${k}-box`).checked])));
    this.#error(null);
    const mic = this.inUse('audio');
    if (!mic) return;
    const boxes = PROCESSING.map((k) => $(`${k}-box`));
    for (const box of boxes) box.disabled = true;
    const { deviceId } = mic.getSettings();
    // Chromium gives a new track of a microphone still open the open
    // one's processing, whatever was asked: the old one goes first, and
    // every copy of it (the others hear a moment of silence).
    this.releaseMicrophone();
    mic.stop();
    let { track, message } = await getDeviceTrack('audio', deviceId);
    if (message) {
      this.#error(message);
      setAudioProcessing(before);
      ({ track } = await getDeviceTrack('audio', deviceId));
    }
    for (const box of boxes) box.disabled = false;
    if (track) await useTrack(track);
    if (message) await this.#fill(); // back to what is in use
  }

  async #fill() {
    const devices = await listDevices();
    for (const { select, devices: list, kind } of KINDS) {
      const track = this.inUse(kind);
      // Without one in use, "None" heads the list and choosing a device
      // starts it. (Before any capture was allowed the browser names no
      // devices: the list is empty then, and the call's buttons ask.)
      fillSelect($(select), devices[list], track?.getSettings().deviceId, { none: track ? null : 'None in use' });
    }
    if (this.canChooseSpeaker) fillSelect(this.speaker, devices.audiooutput, this.speakerInUse() ?? 'default', { empty: 'System default' });
    // What the microphone in use does (a browser may not give all that was
    // asked), or else what the next one will be asked for.
    const settings = this.inUse('audio')?.getSettings() ?? {};
    const chosen = audioProcessing();
    for (const key of PROCESSING) $(`${key}-box`).checked = settings[key] ?? chosen[key];
    $('effect-select').value = this.effect();
  }

  #error(text) {
    setText('devices-error', text);
  }
}

/**
 * Lists `devices` in `select`, the one in use selected. `none` labels a
 * first entry for "no device in use"; `empty` the entry of an empty list.
 */
function fillSelect(select, devices, selectedId, { none = null, empty = 'None found' } = {}) {
  select.replaceChildren();
  if (none && devices.length) select.append(new Option(none, '', true, true));
  devices.forEach((d, i) => {
    const option = new Option(d.label || `Device ${i + 1}`, d.deviceId);
    option.selected = d.deviceId === selectedId;
    select.append(option);
  });
  if (!devices.length) select.append(new Option(none ?? empty, ''));
  select.disabled = devices.length === 0;
}
