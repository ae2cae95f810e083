// A locked room, as the people in the call see it: the "Lock room" button,
// and who knocks, each with "Let in" and "Turn away". The server keeps the
// lock and the knocks (docs/protocol.md, "Locked rooms"); this shows them
// and sends what the person chooses. Anyone taking part in the call may
// do either. A locked room may stay open to its audience ("Open to
// audience"): those who join by the link to watch come in without
// asking, and only those who would take part knock.

import { $, button } from './ui.js';

export class Lobby {
  #knocks = new Map(); // peer id -> its list item

  /**
   * @param {object} o
   * @param {(locked: boolean, openToAudience: boolean) => void} o.lock locks or unlocks the room
   * @param {(id: string) => void} o.admit lets someone knocking in
   * @param {(id: string) => void} o.deny turns someone knocking away
   * @param {(text: string) => void} o.announce says something in the call's notice
   */
  constructor({ lock, admit, deny, announce }) {
    this.locked = false;
    this.openToAudience = false;
    this.button = $('lock-btn');
    this.audienceButton = $('audience-btn');
    this.section = $('knocks');
    this.list = $('knock-list');
    this.admit = admit;
    this.deny = deny;
    this.announce = announce;
    this.button.addEventListener('click', () => lock(!this.locked, false));
    this.audienceButton.addEventListener('click', () => lock(true, !this.openToAudience));
  }

  /** The room as a welcome describes it: locked or not, and who knocks. */
  reset({ locked = false, openToAudience = false, waiting = [] } = {}) {
    this.setLocked(locked, openToAudience);
    for (const id of [...this.#knocks.keys()]) this.ended(id);
    for (const peer of waiting) this.knock(peer, { quiet: true });
  }

  setLocked(locked, openToAudience = false) {
    this.locked = locked;
    this.openToAudience = locked && openToAudience;
    this.button.textContent = locked ? 'Unlock room' : 'Lock room';
    this.button.setAttribute('aria-pressed', String(locked));
    // Only a locked room can be open to its audience; hidden from one
    // who watches, as the lock button is.
    this.audienceButton.hidden = !locked || this.button.hidden;
    this.audienceButton.setAttribute('aria-pressed', String(this.openToAudience));
  }

  /** Someone knocks: a line with a way in and a way out, said aloud unless `quiet`. */
  knock({ id, name, watching = false }, { quiet = false } = {}) {
    if (this.#knocks.has(id)) return;
    const item = document.createElement('li');
    const text = document.createElement('span');
    text.textContent = watching ? `${name} asks to watch` : `${name} asks to join`;
    const letIn = button('Let in', `Let ${name} in`, 'primary');
    const away = button('Turn away', `Turn ${name} away`);
    for (const [b, act] of [[letIn, this.admit], [away, this.deny]]) {
      b.addEventListener('click', () => {
        letIn.disabled = true;
        away.disabled = true;
        act(id);
      });
    }
    item.append(text, ' ', letIn, ' ', away);
    this.#knocks.set(id, item);
    this.list.append(item);
    this.section.hidden = false;
    if (!quiet) this.announce(`${text.textContent}.`);
  }

  /** Someone stopped knocking: let in, turned away or gone. */
  ended(id) {
    this.#knocks.get(id)?.remove();
    this.#knocks.delete(id);
    this.section.hidden = this.#knocks.size === 0;
  }
}
