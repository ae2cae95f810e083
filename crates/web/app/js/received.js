// Where a file being received is kept until the person saves it: on disk,
// in the origin private file system (OPFS), written as it arrives, so a
// file is bounded by the disk rather than by the page's memory. A browser
// without writable OPFS files, or with its storage off (some private
// windows), keeps it in memory instead, as Blobs the browser may page
// out, up to MEMORY_LIMIT.
//
// Each page keeps its files in a folder of its own, `received/<random>`,
// and holds a Web Lock named after that folder for as long as it lives. A
// page that starts removes the folders whose lock nobody holds: those of
// pages that have closed, never those of another tab still in a call.

import { formatSize } from './ui.js';

/** The largest file kept in memory, where the disk cannot be used. */
export const MEMORY_LIMIT = 512 * 1024 * 1024;
/** Bytes gathered before each write: one write per message would be slow. */
const BATCH_BYTES = 1024 * 1024;
/**
 * What may wait for the disk, arrived but not yet written. A data channel
 * cannot be paused by its reader, so a disk slower than the network
 * would otherwise fill memory; past this the transfer fails instead.
 */
const MAX_WAITING_BYTES = 128 * 1024 * 1024;
const FOLDER = 'received';
const LOCK_PREFIX = 'callisto-received-';

export class StoreError extends Error {}

/** Whether this browser can write a received file to disk as it comes. */
function diskWritable() {
  return typeof navigator !== 'undefined' && typeof navigator.storage?.getDirectory === 'function' &&
    typeof navigator.locks?.request === 'function' &&
    typeof globalThis.FileSystemFileHandle?.prototype.createWritable === 'function';
}

let ownFolder = null;

/** This page's folder, made (with its lock held) on first use. */
function pageFolder() {
  ownFolder ??= (async () => {
    const all = await (await navigator.storage.getDirectory()).getDirectoryHandle(FOLDER, { create: true });
    const id = crypto.randomUUID();
    // The lock is held until the page goes: its callback never returns.
    await new Promise((held) => navigator.locks.request(LOCK_PREFIX + id, () => {
      held();
      return new Promise(() => {});
    }));
    return all.getDirectoryHandle(id, { create: true });
  })();
  return ownFolder;
}

/**
 * Removes what pages that have closed left on disk: files received and
 * never removed (the page closed first), or half received. Call once at
 * start; it never throws.
 */
export async function forgetAbandoned() {
  if (!diskWritable()) return;
  try {
    const all = await (await navigator.storage.getDirectory()).getDirectoryHandle(FOLDER, { create: true });
    // Listed first, then removed: not while the listing is read.
    const folders = [];
    for await (const [name, handle] of all.entries()) if (handle.kind === 'directory') folders.push(name);
    for (const name of folders) {
      await navigator.locks.request(LOCK_PREFIX + name, { ifAvailable: true }, async (lock) => {
        if (lock) await all.removeEntry(name, { recursive: true });
      });
    }
  } catch (err) {
    console.warn(`could not remove files received by pages since closed: ${err.message}`);
  }
}

/** Kept on disk: one OPFS file, written in order. */
class DiskStore {
  #folder;
  #name = crypto.randomUUID();
  #handle = null;
  #writable = null;

  /** @param {number} size the bytes to come, checked against the space left */
  static async open(size) {
    const { quota, usage } = await navigator.storage.estimate();
    if (quota !== undefined && usage !== undefined && quota - usage < size) {
      throw new StoreError(`not enough space in this browser's storage (${formatSize(quota - usage)} free)`);
    }
    const store = new DiskStore();
    store.#folder = await pageFolder();
    try {
      store.#handle = await store.#folder.getFileHandle(store.#name, { create: true });
      store.#writable = await store.#handle.createWritable();
    } catch (err) {
      await store.discard();
      throw err;
    }
    return store;
  }

  write(bytes) { return this.#writable.write(bytes); }

  async finish() {
    await this.#writable.close();
    this.#writable = null;
    return this.#handle.getFile();
  }

  async discard() {
    await this.#writable?.abort().catch(() => {});
    await this.#folder.removeEntry(this.#name).catch(() => {});
  }
}

/** Kept in memory, as Blobs of a batch each. */
class MemoryStore {
  #parts = [];

  static async open(size) {
    if (size > MEMORY_LIMIT) {
      throw new StoreError(`this browser can keep files of at most ${formatSize(MEMORY_LIMIT)} (it cannot write them to disk as they come)`);
    }
    return new MemoryStore();
  }

  write(bytes) { this.#parts.push(new Blob([bytes])); }
  async finish() { return new Blob(this.#parts, { type: 'application/octet-stream' }); }
  async discard() { this.#parts = []; }
}

/** On disk where the browser allows it, else in memory. */
async function openStore(size) {
  if (diskWritable()) {
    try {
      return await DiskStore.open(size);
    } catch (err) {
      if (err instanceof StoreError) throw err;
      // Storage refused (off in a private window, a site setting): memory.
      console.warn(`cannot keep a received file on disk (${err.message}); keeping it in memory`);
    }
  }
  return MemoryStore.open(size);
}

/**
 * One file's bytes as they arrive. `write` takes them in order at once,
 * and they are stored behind it; `finish` gives the whole file; `discard`
 * lets it go, from disk too. If storing fails, `onerror(why)` is called
 * once, and the file is discarded.
 */
export class Sink {
  #chain;
  #store = null;
  #batch = [];
  #batchBytes = 0;
  #waiting = 0;
  #failed = false;
  #discarded = false;
  onerror = () => {};

  /**
   * @param {number} size the bytes to come
   * @param {(size: number) => Promise<{write, finish, discard}>} open where to keep them (for tests)
   */
  constructor(size, open = openStore) {
    this.#chain = open(size).then((store) => { this.#store = store; });
    this.#chain.catch((err) => this.#fail(err));
  }

  write(bytes) {
    if (this.#failed || this.#discarded) return;
    this.#batch.push(bytes);
    this.#batchBytes += bytes.byteLength;
    if (this.#batchBytes >= BATCH_BYTES) this.#flush();
  }

  /** @returns {Promise<Blob>} the whole file, once every byte is stored */
  finish() {
    this.#flush();
    const file = this.#chain.then(() => this.#store.finish());
    file.catch((err) => this.#fail(err));
    return file;
  }

  /** Drops the file, or what has come of it, wherever it is kept. */
  discard() {
    if (this.#discarded) return;
    this.#discarded = true;
    this.#batch = [];
    this.#chain = this.#chain.catch(() => {}).then(() => this.#store?.discard());
  }

  #flush() {
    if (this.#batchBytes === 0 || this.#failed || this.#discarded) return;
    const bytes = concat(this.#batch, this.#batchBytes);
    this.#batch = [];
    this.#batchBytes = 0;
    this.#waiting += bytes.byteLength;
    if (this.#waiting > MAX_WAITING_BYTES) {
      this.#fail(new StoreError(`the disk could not keep up (${formatSize(this.#waiting)} waiting to be written)`));
      return;
    }
    this.#chain = this.#chain.then(async () => {
      if (this.#discarded) return;
      await this.#store.write(bytes);
      this.#waiting -= bytes.byteLength;
    });
    this.#chain.catch((err) => this.#fail(err));
  }

  #fail(err) {
    if (this.#failed || this.#discarded) return;
    this.#failed = true;
    this.discard();
    this.onerror(err instanceof StoreError ? err.message : `could not store it (${err.message})`);
  }
}

function concat(chunks, total) {
  if (chunks.length === 1) return new Uint8Array(chunks[0]);
  const out = new Uint8Array(total);
  let at = 0;
  for (const chunk of chunks) {
    out.set(new Uint8Array(chunk), at);
    at += chunk.byteLength;
  }
  return out;
}
