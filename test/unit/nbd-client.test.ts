/** The NBD client against a tiny fake server: the handshake, extents over several requests, refusals and errors with the server's text. */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { NbdClient, NbdError } from '../../shared/vm/nbd-client.js';

const EXPORT_BYTES = 8 << 20;
const CONTEXT = 'qemu:dirty-bitmap:b0';
const CONTEXT_ID = 7;
/** the fake describes at most this much per request, so the client must ask again */
const MAX_DESCRIBED = 3 << 20;

/** dirty where [1 MiB, 1 MiB + 8 KiB) and [5 MiB, 6 MiB) */
function statusAt(offset: number): { length: number; flags: number } {
  const runs: [number, number, number][] = [
    [0, 1 << 20, 0],
    [1 << 20, (1 << 20) + 8192, 1],
    [(1 << 20) + 8192, 5 << 20, 0],
    [5 << 20, 6 << 20, 1],
    [6 << 20, EXPORT_BYTES, 0],
  ];
  const [, end, flags] = runs.find(([s, e]) => offset >= s && offset < e)!;
  return { length: end - offset, flags };
}

interface Behaviour {
  /** refuse NBD_OPT_GO with NBD_REP_ERR_UNKNOWN and this text */
  refuseGo?: string;
  /** answer SET_META_CONTEXT without a context */
  noContext?: boolean;
  /** answer BLOCK_STATUS with an error chunk with this text */
  statusError?: string;
}

interface Seen {
  requests: { type: number; offset: number; length: number }[];
  disconnected: boolean;
}

/** Reads exactly `n` bytes. */
function reader(socket: Socket): (n: number) => Promise<Buffer> {
  let buffered = Buffer.alloc(0);
  let waiting: (() => void) | undefined;
  socket.on('data', (d: Buffer) => {
    buffered = Buffer.concat([buffered, d]);
    waiting?.();
  });
  socket.on('end', () => waiting?.());
  return async (n) => {
    while (buffered.byteLength < n) {
      if (socket.readableEnded) throw new Error('closed');
      await new Promise<void>((r) => (waiting = r));
    }
    const out = buffered.subarray(0, n);
    buffered = buffered.subarray(n);
    return out;
  };
}

function optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(20);
  h.writeBigUInt64BE(0x3e889045565a9n, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(type >>> 0, 12);
  h.writeUInt32BE(data.byteLength, 16);
  return Buffer.concat([h, data]);
}

function chunk(flags: number, type: number, cookie: bigint, payload: Buffer): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(0x668e33ef, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(cookie, 8);
  h.writeUInt32BE(payload.byteLength, 16);
  return Buffer.concat([h, payload]);
}

async function serve(socket: Socket, behaviour: Behaviour, seen: Seen): Promise<void> {
  const read = reader(socket);
  const greeting = Buffer.alloc(18);
  greeting.writeBigUInt64BE(0x4e42444d41474943n, 0);
  greeting.writeBigUInt64BE(0x49484156454f5054n, 8);
  greeting.writeUInt16BE(3, 16);
  socket.write(greeting);
  await read(4);
  for (;;) {
    const h = await read(16);
    const option = h.readUInt32BE(8);
    const data = await read(h.readUInt32BE(12));
    if (option === 8) socket.write(optionReply(8, 1));
    else if (option === 10) {
      const nameBytes = data.readUInt32BE(0);
      const query = data.subarray(4 + nameBytes + 8).toString();
      if (!behaviour.noContext && query === CONTEXT) {
        const id = Buffer.alloc(4);
        id.writeUInt32BE(CONTEXT_ID);
        socket.write(optionReply(10, 4, Buffer.concat([id, Buffer.from(CONTEXT)])));
      }
      socket.write(optionReply(10, 1));
    } else if (option === 7) {
      if (behaviour.refuseGo) {
        socket.write(optionReply(7, 0x80000006, Buffer.from(behaviour.refuseGo)));
        continue;
      }
      const info = Buffer.alloc(12);
      info.writeUInt16BE(0, 0);
      info.writeBigUInt64BE(BigInt(EXPORT_BYTES), 2);
      info.writeUInt16BE(1, 10);
      socket.write(Buffer.concat([optionReply(7, 3, info), optionReply(7, 1)]));
      break;
    } else socket.write(optionReply(option, 0x80000001));
  }
  for (;;) {
    const r = await read(28);
    const type = r.readUInt16BE(6);
    const cookie = r.readBigUInt64BE(8);
    const offset = Number(r.readBigUInt64BE(16));
    const length = r.readUInt32BE(24);
    seen.requests.push({ type, offset, length });
    if (type === 2) {
      seen.disconnected = true;
      socket.end();
      return;
    }
    if (behaviour.statusError) {
      const text = Buffer.from(behaviour.statusError);
      const payload = Buffer.alloc(6);
      payload.writeUInt32BE(22, 0);
      payload.writeUInt16BE(text.byteLength, 4);
      socket.write(chunk(1, 0x8001, cookie, Buffer.concat([payload, text])));
      continue;
    }
    // the extents up to MAX_DESCRIBED, then another context's chunk (ignored), then done
    const descriptors: Buffer[] = [];
    let at = offset;
    const end = Math.min(offset + length, offset + MAX_DESCRIBED);
    while (at < end) {
      const s = statusAt(at);
      const d = Buffer.alloc(8);
      d.writeUInt32BE(Math.min(s.length, end - at), 0);
      d.writeUInt32BE(s.flags, 4);
      descriptors.push(d);
      at += Math.min(s.length, end - at);
    }
    const id = Buffer.alloc(4);
    id.writeUInt32BE(CONTEXT_ID);
    const other = Buffer.alloc(12);
    other.writeUInt32BE(99, 0);
    other.writeUInt32BE(length, 4);
    other.writeUInt32BE(1, 8);
    socket.write(Buffer.concat([chunk(0, 5, cookie, Buffer.concat([id, ...descriptors])), chunk(0, 5, cookie, other), chunk(1, 0, cookie, Buffer.alloc(0))]));
  }
}

describe('NbdClient', () => {
  let dir: string;
  let server: Server;
  let behaviour: Behaviour = {};
  let seen: Seen = { requests: [], disconnected: false };
  const path = (): string => join(dir, 'nbd.sock');

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'nbd-client-'));
    server = createServer((s) => void serve(s, behaviour, seen).catch(() => s.destroy()));
    await new Promise<void>((r) => server.listen(path(), r));
  });

  after(async () => {
    server.close();
    await rm(dir, { recursive: true, force: true });
  });

  const reset = (b: Behaviour): void => {
    behaviour = b;
    seen = { requests: [], disconnected: false };
  };

  test('negotiates the export and its context, and reads the extents of the whole export over several requests', async () => {
    reset({});
    const client = await NbdClient.connect(path(), { exportName: 'e', metaContext: CONTEXT });
    assert.equal(client.exportBytes, EXPORT_BYTES);
    const extents = await client.blockStatus(0, EXPORT_BYTES);
    await client.close();
    const dirty = extents.filter((e) => e.flags & 1).map((e) => [e.offset, e.length]);
    assert.deepEqual(dirty, [
      [1 << 20, 8192],
      [5 << 20, 1 << 20],
    ]);
    // contiguous, covering the whole export
    assert.equal(extents.reduce((at, e) => (assert.equal(e.offset, at), at + e.length), 0), EXPORT_BYTES);
    assert.deepEqual(
      seen.requests.filter((r) => r.type === 7).map((r) => r.offset),
      [0, 3 << 20, 6 << 20],
    );
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(seen.disconnected, true);
  });

  test("a refused option fails with the server's error and text", async () => {
    reset({ refuseGo: "export 'e' not present" });
    await assert.rejects(NbdClient.connect(path(), { exportName: 'e', metaContext: CONTEXT }), (err: unknown) => {
      assert.ok(err instanceof NbdError);
      assert.equal(err.code, 'NBD_REP_ERR_UNKNOWN');
      assert.match(err.message, /refused NBD_OPT_GO: NBD_REP_ERR_UNKNOWN: export 'e' not present/);
      return true;
    });
  });

  test('a context the server does not have is named', async () => {
    reset({ noContext: true });
    await assert.rejects(NbdClient.connect(path(), { exportName: 'e', metaContext: CONTEXT }), /no meta context qemu:dirty-bitmap:b0 on export e/);
  });

  test("a failed BLOCK_STATUS carries the server's error and text", async () => {
    reset({ statusError: 'bitmap gone' });
    const client = await NbdClient.connect(path(), { exportName: 'e', metaContext: CONTEXT });
    await assert.rejects(client.blockStatus(0, 4096), (err: unknown) => {
      assert.ok(err instanceof NbdError);
      assert.equal(err.code, 'EINVAL');
      assert.match(err.message, /EINVAL: bitmap gone/);
      return true;
    });
    await client.close();
    await assert.rejects(client.blockStatus(0, EXPORT_BYTES + 1), RangeError);
  });
});
