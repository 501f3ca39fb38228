/**
 * A minimal NBD client (the protocol of NetworkBlockDevice/nbd doc/proto.md) over a unix socket,
 * for one thing: reading a QEMU dirty bitmap's extents through an export's `qemu:dirty-bitmap:NAME`
 * meta context. Fixed newstyle handshake, structured replies, SET_META_CONTEXT, GO, then
 * BLOCK_STATUS requests one at a time, and DISC.
 */
import { connect, type Socket } from 'node:net';

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;

const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const OPT_SET_META_CONTEXT = 10;

const REP_ACK = 1;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const REP_ERROR_BIT = 0x80000000;
const INFO_EXPORT = 0;

const CMD_DISC = 2;
const CMD_BLOCK_STATUS = 7;

const REPLY_FLAG_DONE = 1;
const REPLY_TYPE_NONE = 0;
const REPLY_TYPE_BLOCK_STATUS = 5;
const REPLY_TYPE_ERROR_BIT = 0x8000;

/** The option reply errors' names (doc/proto.md "Option reply types"). */
const OPTION_ERRORS: Record<number, string> = {
  1: 'NBD_REP_ERR_UNSUP',
  2: 'NBD_REP_ERR_POLICY',
  3: 'NBD_REP_ERR_INVALID',
  4: 'NBD_REP_ERR_PLATFORM',
  5: 'NBD_REP_ERR_TLS_REQD',
  6: 'NBD_REP_ERR_UNKNOWN',
  7: 'NBD_REP_ERR_SHUTDOWN',
  8: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  9: 'NBD_REP_ERR_TOO_BIG',
};

/** Commands' error values (doc/proto.md "Error values"). */
const COMMAND_ERRORS: Record<number, string> = { 1: 'EPERM', 5: 'EIO', 12: 'ENOMEM', 22: 'EINVAL', 28: 'ENOSPC', 75: 'EOVERFLOW', 108: 'ESHUTDOWN' };

/** The server broke the protocol, refused an option or failed a command; the message carries the server's own text. */
export class NbdError extends Error {
  override name = 'NbdError';
  constructor(
    message: string,
    /** the option reply's error or the command's error value, where the server gave one */
    readonly code?: string,
  ) {
    super(message);
  }
}

/** A run of bytes with one status (for a dirty bitmap: bit 0 set = dirty). */
export interface NbdExtent {
  offset: number;
  length: number;
  flags: number;
}

/** Reads exactly the bytes asked for from a socket, in order. */
class SocketReader {
  private readonly chunks: Buffer[] = [];
  private buffered = 0;
  private waiting: { bytes: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private closed: Error | undefined;

  constructor(socket: Socket) {
    socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.buffered += d.byteLength;
      this.serve();
    });
    const end = (err?: Error): void => {
      this.closed ??= new NbdError(`the NBD server closed the connection${err ? `: ${err.message}` : ''}`);
      const w = this.waiting;
      this.waiting = undefined;
      w?.reject(this.closed);
    };
    socket.on('error', end);
    socket.on('close', () => end());
  }

  read(bytes: number): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      this.waiting = { bytes, resolve, reject };
      this.serve();
    });
  }

  private serve(): void {
    const w = this.waiting;
    if (!w) return;
    if (this.buffered < w.bytes) {
      if (this.closed) {
        this.waiting = undefined;
        w.reject(this.closed);
      }
      return;
    }
    this.waiting = undefined;
    const all = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    this.chunks.length = 0;
    const rest = all.subarray(w.bytes);
    if (rest.byteLength) this.chunks.push(rest);
    this.buffered = rest.byteLength;
    w.resolve(all.subarray(0, w.bytes));
  }
}

function sizedString(s: string): Buffer {
  const text = Buffer.from(s, 'utf8');
  const b = Buffer.alloc(4 + text.byteLength);
  b.writeUInt32BE(text.byteLength, 0);
  text.copy(b, 4);
  return b;
}

export interface NbdConnectOptions {
  /** the export's name */
  exportName: string;
  /** the meta context to select, e.g. `qemu:dirty-bitmap:NAME` */
  metaContext: string;
  /** for the handshake (default 10 s) */
  timeoutMs?: number;
}

/** One connection to an NBD export with one meta context selected. */
export class NbdClient {
  private cookie = 0n;

  private constructor(
    private readonly socket: Socket,
    private readonly reader: SocketReader,
    /** the export's size in bytes */
    readonly exportBytes: number,
    private readonly contextId: number,
  ) {}

  /** Connects to the unix socket `path` and negotiates the export and its meta context. */
  static async connect(path: string, options: NbdConnectOptions): Promise<NbdClient> {
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = connect(path);
      s.once('connect', () => {
        s.off('error', reject);
        resolve(s);
      });
      s.once('error', (err) => reject(new NbdError(`cannot connect to the NBD server at ${path}: ${err.message}`)));
    });
    const reader = new SocketReader(socket);
    const timer = setTimeout(() => socket.destroy(new NbdError(`the NBD handshake with ${path} did not finish within ${(options.timeoutMs ?? 10_000) / 1000} s`)), options.timeoutMs ?? 10_000);
    try {
      const { exportBytes, contextId } = await handshake(socket, reader, options);
      return new NbdClient(socket, reader, exportBytes, contextId);
    } catch (err) {
      socket.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * The extents of [offset, offset + length) in the selected context: the server may describe less
   * than asked per request, so requests follow until the range is covered.
   */
  async blockStatus(offset: number, length: number): Promise<NbdExtent[]> {
    if (offset < 0 || length < 0 || offset + length > this.exportBytes) throw new RangeError(`block status of [${offset}, ${offset + length}) outside the export's ${this.exportBytes} bytes`);
    const extents: NbdExtent[] = [];
    let at = offset;
    const end = offset + length;
    while (at < end) {
      // the request's length is 32 bits: ask in pieces below 4 GiB, aligned to 1 MiB
      const want = Math.min(end - at, 0xfff00000);
      const got = await this.blockStatusOnce(at, want);
      if (got.length === 0) throw new NbdError(`the NBD server described no extent at offset ${at}`);
      for (const e of got) {
        const length = Math.min(e.length, end - at);
        if (length <= 0) break;
        extents.push({ offset: at, length, flags: e.flags });
        at += length;
      }
    }
    return extents;
  }

  private async blockStatusOnce(offset: number, length: number): Promise<{ length: number; flags: number }[]> {
    const cookie = ++this.cookie;
    const request = Buffer.alloc(28);
    request.writeUInt32BE(REQUEST_MAGIC, 0);
    request.writeUInt16BE(0, 4);
    request.writeUInt16BE(CMD_BLOCK_STATUS, 6);
    request.writeBigUInt64BE(cookie, 8);
    request.writeBigUInt64BE(BigInt(offset), 16);
    request.writeUInt32BE(length, 24);
    this.socket.write(request);
    const extents: { length: number; flags: number }[] = [];
    let error: NbdError | undefined;
    for (;;) {
      const head = await this.reader.read(4);
      const magic = head.readUInt32BE(0);
      if (magic === SIMPLE_REPLY_MAGIC) {
        // a simple reply to BLOCK_STATUS can only be an error
        const rest = await this.reader.read(12);
        const code = rest.readUInt32BE(0);
        throw new NbdError(`NBD_CMD_BLOCK_STATUS at ${offset}+${length}: ${COMMAND_ERRORS[code] ?? `error ${code}`}`, COMMAND_ERRORS[code] ?? String(code));
      }
      if (magic !== STRUCTURED_REPLY_MAGIC) throw new NbdError(`the NBD server sent a reply with magic 0x${magic.toString(16)}`);
      const h = await this.reader.read(16);
      const flags = h.readUInt16BE(0);
      const type = h.readUInt16BE(2);
      const replyCookie = h.readBigUInt64BE(4);
      const payloadBytes = h.readUInt32BE(12);
      const payload = payloadBytes ? await this.reader.read(payloadBytes) : Buffer.alloc(0);
      if (replyCookie !== cookie) throw new NbdError(`the NBD server answered request ${replyCookie}, not ${cookie}`);
      if (type === REPLY_TYPE_BLOCK_STATUS) {
        if (payloadBytes < 4 || (payloadBytes - 4) % 8 !== 0) throw new NbdError(`NBD_REPLY_TYPE_BLOCK_STATUS of ${payloadBytes} bytes`);
        const context = payload.readUInt32BE(0);
        if (context === this.contextId) for (let p = 4; p < payloadBytes; p += 8) extents.push({ length: payload.readUInt32BE(p), flags: payload.readUInt32BE(p + 4) });
      } else if (type & REPLY_TYPE_ERROR_BIT) {
        const code = payloadBytes >= 6 ? payload.readUInt32BE(0) : 0;
        const messageBytes = payloadBytes >= 6 ? payload.readUInt16BE(4) : 0;
        const text = payload.subarray(6, 6 + messageBytes).toString('utf8');
        const name = COMMAND_ERRORS[code] ?? `error ${code}`;
        error ??= new NbdError(`NBD_CMD_BLOCK_STATUS at ${offset}+${length}: ${name}${text ? `: ${text}` : ''}`, COMMAND_ERRORS[code] ?? String(code));
      } else if (type !== REPLY_TYPE_NONE) {
        throw new NbdError(`the NBD server sent reply chunk type ${type} to NBD_CMD_BLOCK_STATUS`);
      }
      if (flags & REPLY_FLAG_DONE) break;
    }
    if (error) throw error;
    return extents;
  }

  /** NBD_CMD_DISC, then the connection closed. */
  async close(): Promise<void> {
    if (this.socket.destroyed) return;
    const request = Buffer.alloc(28);
    request.writeUInt32BE(REQUEST_MAGIC, 0);
    request.writeUInt16BE(CMD_DISC, 6);
    request.writeBigUInt64BE(++this.cookie, 8);
    await new Promise<void>((resolve) => this.socket.end(request, () => resolve()));
    this.socket.destroy();
  }
}

async function handshake(socket: Socket, reader: SocketReader, options: NbdConnectOptions): Promise<{ exportBytes: number; contextId: number }> {
  const greeting = await reader.read(18);
  if (greeting.readBigUInt64BE(0) !== NBDMAGIC) throw new NbdError('not an NBD server: no NBDMAGIC');
  if (greeting.readBigUInt64BE(8) !== IHAVEOPT) throw new NbdError('the NBD server speaks the old style handshake, not fixed newstyle');
  const serverFlags = greeting.readUInt16BE(16);
  if (!(serverFlags & FLAG_FIXED_NEWSTYLE)) throw new NbdError('the NBD server does not speak the fixed newstyle handshake');
  const clientFlags = Buffer.alloc(4);
  clientFlags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (serverFlags & FLAG_NO_ZEROES), 0);
  socket.write(clientFlags);

  const sendOption = (option: number, data: Buffer): void => {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.byteLength, 12);
    socket.write(Buffer.concat([h, data]));
  };
  const optionName = (o: number): string => ({ [OPT_GO]: 'NBD_OPT_GO', [OPT_STRUCTURED_REPLY]: 'NBD_OPT_STRUCTURED_REPLY', [OPT_SET_META_CONTEXT]: 'NBD_OPT_SET_META_CONTEXT' })[o] ?? `option ${o}`;
  /** the replies to `option` up to its ACK; a refusal throws with the server's text */
  const replies = async (option: number, onReply: (type: number, data: Buffer) => void): Promise<void> => {
    for (;;) {
      const h = await reader.read(20);
      if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new NbdError(`the NBD server's reply to ${optionName(option)} has a bad magic`);
      const replyTo = h.readUInt32BE(8);
      const type = h.readUInt32BE(12);
      const bytes = h.readUInt32BE(16);
      const data = bytes ? await reader.read(bytes) : Buffer.alloc(0);
      if (replyTo !== option) throw new NbdError(`the NBD server answered option ${replyTo} where ${optionName(option)} was asked`);
      if (type & REP_ERROR_BIT) {
        const code = OPTION_ERRORS[(type & ~REP_ERROR_BIT) >>> 0] ?? `error 0x${type.toString(16)}`;
        const text = data.toString('utf8');
        throw new NbdError(`the NBD server refused ${optionName(option)}: ${code}${text ? `: ${text}` : ''}`, code);
      }
      if (type === REP_ACK) return;
      onReply(type, data);
    }
  };

  sendOption(OPT_STRUCTURED_REPLY, Buffer.alloc(0));
  await replies(OPT_STRUCTURED_REPLY, () => undefined);

  const queries = Buffer.alloc(4);
  queries.writeUInt32BE(1, 0);
  sendOption(OPT_SET_META_CONTEXT, Buffer.concat([sizedString(options.exportName), queries, sizedString(options.metaContext)]));
  let contextId: number | undefined;
  await replies(OPT_SET_META_CONTEXT, (type, data) => {
    if (type === REP_META_CONTEXT && data.byteLength >= 4 && data.subarray(4).toString('utf8') === options.metaContext) contextId = data.readUInt32BE(0);
  });
  if (contextId === undefined) throw new NbdError(`the NBD server has no meta context ${options.metaContext} on export ${options.exportName}`);

  const noInfoRequests = Buffer.alloc(2);
  sendOption(OPT_GO, Buffer.concat([sizedString(options.exportName), noInfoRequests]));
  let exportBytes: number | undefined;
  await replies(OPT_GO, (type, data) => {
    if (type === REP_INFO && data.byteLength >= 12 && data.readUInt16BE(0) === INFO_EXPORT) exportBytes = Number(data.readBigUInt64BE(2));
  });
  if (exportBytes === undefined) throw new NbdError(`the NBD server did not give export ${options.exportName}'s size`);
  return { exportBytes, contextId };
}
