// What the app keeps in this browser (localStorage): the name last used,
// a server's access code, the microphone's processing. Storage may be off
// (a private window, a site setting): then nothing is kept, and nothing
// fails; the person is asked again next time.

/** The value kept under `key`, or null. */
export function stored(key) {
  try { return localStorage.getItem(key); } catch { return null; }
}

/** Keeps `value` under `key`; null forgets it. */
export function store(key, value) {
  try {
    if (value === null) localStorage.removeItem(key);
    else localStorage.setItem(key, value);
  } catch { /* storage off */ }
}
