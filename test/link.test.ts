/**
 * The WAN link lets no one in without the key or a certificate, rejects every bad frame naming the
 * cause, and survives corruption and drops by reconnecting and resending: images stay identical.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { createServer, connect, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { migrate } from '../cli/migrate.js';
import { WanLink } from '../services/sender/link.js';
import { PageKind, type Chunk } from '../shared/model/chunk.js';
import { encodeChunk } from '../shared/wire/chunk-codec.js';
import { LINK_ENV, linkSecurityFromEnv, type LinkSecurity } from '../shared/wire/link-security.js';
import { DEFAULT_MODE } from '../shared/model/mode.js';
import { hashImageFile } from '../shared/image/pages.js';
import { FrameType, encodeChunkFrame, encodeJsonFrame, parseLinkError, parseResult, type Frame } from '../shared/wire/frames.js';
import { makeWorkspace, migrateOptions, startDestination, type Destination, type Workspace } from './helpers/cloudlets.js';
import { talk } from './helpers/link-peer.js';

const IMAGE_BYTES = 4 << 20;
let ws: Workspace;
before(async () => {
  ws = await makeWorkspace(IMAGE_BYTES, IMAGE_BYTES, 21);
});
after(() => ws.cleanup());

const psk = (): LinkSecurity => ({ kind: 'psk', key: randomBytes(32), identity: 'cloudlet-handoff' });

function helloFor(dest: Destination, migrationId: string): Buffer {
  return encodeJsonFrame(FrameType.Hello, { migrationId, baseHashes: dest.receiver.baseHashes, bytes: { memory: IMAGE_BYTES, disk: IMAGE_BYTES } });
}

function openLink(dest: Destination, security: LinkSecurity, migrationId = 'auth-test') {
  return WanLink.open({
    address: dest.address,
    hello: { migrationId, baseHashes: dest.receiver.baseHashes, bytes: { memory: IMAGE_BYTES, disk: IMAGE_BYTES } },
    security,
    rateCapBps: 0,
    handshakeTimeoutMs: 5000,
  });
}

/** A one-page raw chunk for the memory image. */
function onePageChunk(migrationId: string, pageIndex: number): Chunk {
  return {
    migrationId,
    round: 0,
    seq: 0,
    part: 0,
    parts: 1,
    image: 0,
    mode: { delta: 'none', compressor: 'none', level: 0 },
    pageIndex: Uint32Array.of(pageIndex),
    kind: Uint8Array.of(PageKind.Raw),
    refImage: Uint8Array.of(0),
    refIndex: Uint32Array.of(0),
    bodyLength: Uint32Array.of(4096),
    check: new Uint8Array(8),
    body: new Uint8Array(4096),
    bodyRawLength: 4096,
  };
}

const chunkFrame = (frameNo: number, chunk: Chunk): Buffer => Buffer.concat(encodeChunkFrame(frameNo, encodeChunk(chunk)));
const findFrame = (frames: Frame[], type: FrameType): Frame | undefined => frames.find((f) => f.type === type);

function makeCertificates(dir: string, name: string): { cert: Buffer; key: Buffer; ca: Buffer } {
  const ssl = (...args: string[]): void => void execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' });
  ssl('req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', `${name}-ca.key`, '-out', `${name}-ca.pem`, '-days', '2', '-subj', `/CN=${name} CA`);
  ssl('req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name} cloudlet`);
  ssl('x509', '-req', '-in', `${name}.csr`, '-CA', `${name}-ca.pem`, '-CAkey', `${name}-ca.key`, '-CAcreateserial', '-out', `${name}.pem`, '-days', '2');
  return { cert: execFileSync('cat', [join(dir, `${name}.pem`)]), key: execFileSync('cat', [join(dir, `${name}.key`)]), ca: execFileSync('cat', [join(dir, `${name}-ca.pem`)]) };
}

describe('WAN link: authentication', { timeout: 120_000 }, () => {
  test('pre-shared key: another key or none is refused before the handshake completes', async () => {
    const key = psk();
    const dest = await startDestination(ws, 'psk', undefined, key);
    try {
      const { link } = await openLink(dest, key);
      link.close();
      await assert.rejects(openLink(dest, psk()), /authentication failed: the (peer|destination) (holds another pre-shared key|closed the link during the TLS handshake)/);
      // a peer without any credential speaks plain TCP: it never gets an answer it can read
      await assert.rejects(openLink(dest, { kind: 'insecure' }), /bad magic|closed|not a handoff peer/);
    } finally {
      await dest.stop();
    }
  });

  test('mutual TLS: a certificate from another CA, or none, is refused', async () => {
    const dir = join(ws.dir, 'certs');
    await mkdir(dir, { recursive: true });
    const ours = makeCertificates(dir, 'ours');
    const theirs = makeCertificates(dir, 'theirs');
    const dest = await startDestination(ws, 'mtls', undefined, { kind: 'mtls', ...ours });
    try {
      // both ends hold certificates our CA signed (here the same one; any it signed will do)
      const { link } = await openLink(dest, { kind: 'mtls', ...ours });
      link.close();
      await assert.rejects(openLink(dest, { kind: 'mtls', cert: theirs.cert, key: theirs.key, ca: ours.ca }), /authentication failed|certificate/);
      await assert.rejects(openLink(dest, psk()), /authentication failed|certificate|handshake/);
    } finally {
      await dest.stop();
    }
  });

  test('credentials from the environment: missing ones are named, a short key is refused', () => {
    assert.throws(() => linkSecurityFromEnv({}), /the WAN link needs credentials: HANDOFF_LINK_PSK/);
    assert.throws(() => linkSecurityFromEnv({ [LINK_ENV.psk]: 'abcd' }), /at least 32 bytes/);
    assert.throws(() => linkSecurityFromEnv({ [LINK_ENV.cert]: '-----BEGIN CERTIFICATE-----' }), /mutual TLS needs .* \(missing key, CA\)/);
    assert.equal(linkSecurityFromEnv({ [LINK_ENV.psk]: 'ab'.repeat(32) }).kind, 'psk');
    assert.equal(linkSecurityFromEnv({ [LINK_ENV.insecure]: '1' }).kind, 'insecure');
  });
});

describe('WAN link: probe', { timeout: 60_000 }, () => {
  test('the destination answers probes at once: a speed before any chunk, capped by the rate cap', async () => {
    const key = psk();
    const dest = await startDestination(ws, 'probe', undefined, key);
    try {
      const { link } = await openLink(dest, key, 'probe-test');
      const bps = await link.probe(64 * 1024, 5000);
      link.close();
      assert.ok(bps !== undefined && bps > 1e6, `loopback probed at ${bps} bit/s`);
      const capped = await WanLink.open({ address: dest.address, hello: { migrationId: 'probe-test-2', baseHashes: dest.receiver.baseHashes, bytes: { memory: IMAGE_BYTES, disk: IMAGE_BYTES } }, security: key, rateCapBps: 2e6, handshakeTimeoutMs: 5000 });
      const cappedBps = await capped.link.probe(64 * 1024, 5000);
      capped.link.close();
      assert.ok(cappedBps !== undefined && cappedBps <= 2e6, `capped link probed at ${cappedBps} bit/s`);
    } finally {
      await dest.stop();
    }
  });
});

describe('WAN link: bad frames are rejected naming the cause', { timeout: 120_000 }, () => {
  let dest: Destination;
  before(async () => {
    dest = await startDestination(ws, 'frames');
  });
  after(() => dest.stop());

  const errorOf = (frames: Frame[]) => {
    const f = findFrame(frames, FrameType.Error);
    assert.ok(f, `no error frame among ${frames.map((x) => x.type).join(',')}`);
    return parseLinkError(f);
  };

  test('not a handoff frame', async () => {
    const e = errorOf(await talk(dest.address, [Buffer.from('GET / HTTP/1.1\r\n\r\n')]));
    assert.match(e.reason, /bad magic/);
    assert.equal(e.resumable, false);
  });

  test('a handshake with a malformed field', async () => {
    const e = errorOf(await talk(dest.address, [encodeJsonFrame(FrameType.Hello, { migrationId: '../etc', baseHashes: dest.receiver.baseHashes, bytes: { memory: 1, disk: 1 } })]));
    assert.match(e.reason, /migration id "\.\.\/etc"/);
  });

  test('a frame with flipped bits: detected by its checksum, the source is told to resend', async () => {
    const frame = chunkFrame(0, onePageChunk('flipped', 3));
    frame[frame.length - 100]! ^= 0x10;
    const e = errorOf(await talk(dest.address, [helloFor(dest, 'flipped'), frame]));
    assert.match(e.reason, /checksum mismatch \(corrupted in transit\)/);
    assert.equal(e.resumable, true);
  });

  test('a truncated frame: the stream after it does not parse as frames', async () => {
    const whole = chunkFrame(0, onePageChunk('truncated', 3));
    const e = errorOf(await talk(dest.address, [helloFor(dest, 'truncated'), whole.subarray(0, 2000), chunkFrame(1, onePageChunk('truncated', 4))]));
    assert.match(e.reason, /checksum mismatch|bad magic/);
  });

  test('a frame for another migration', async () => {
    const resultP = dest.receiver.next();
    const frames = await talk(dest.address, [helloFor(dest, 'mine'), chunkFrame(0, onePageChunk('someone-else', 3))]);
    const result = parseResult(findFrame(frames, FrameType.Result)!);
    assert.equal(result.verified, false);
    assert.match(result.reason!, /chunk for migration someone-else reached migration mine/);
    assert.equal((await resultP).migrationId, 'mine');
    assert.equal(existsSync(join(dest.outDir, 'memory.img')), false, 'an image was left behind');
  });

  test("a page index past the image's end", async () => {
    const resultP = dest.receiver.next();
    const frames = await talk(dest.address, [helloFor(dest, 'past-end'), chunkFrame(0, onePageChunk('past-end', IMAGE_BYTES / 4096))]);
    const result = parseResult(findFrame(frames, FrameType.Result)!);
    assert.match(result.reason!, /page index 1024 is past the end of the memory image \(1024 pages\)/);
    await resultP;
  });
});

/**
 * A TCP proxy between sender and receiver that damages the source's stream once: flips a bit at
 * `flipAt` bytes, or cuts the connection there; with `refuseAfterCut` it accepts no one afterwards.
 */
async function faultyProxy(target: string, fault: { flipAt?: number; cutAt?: number; refuseAfterCut?: boolean }): Promise<{ address: string; server: Server; connections: number; close(): Promise<void> }> {
  const [host, port] = target.split(':');
  let done = false;
  const sockets = new Set<Socket>();
  const state = { connections: 0 };
  const server = createServer((client) => {
    if (done && fault.refuseAfterCut) {
      client.destroy();
      return;
    }
    state.connections++;
    const upstream = connect({ host: host!, port: Number(port) });
    sockets.add(client).add(upstream);
    let forwarded = 0;
    client.on('data', (d: Buffer) => {
      if (!done && fault.flipAt !== undefined && forwarded + d.length > fault.flipAt) {
        d = Buffer.from(d);
        d[fault.flipAt - forwarded]! ^= 0x04;
        done = true;
      }
      if (!done && fault.cutAt !== undefined && forwarded + d.length > fault.cutAt) {
        done = true;
        client.destroy();
        upstream.destroy();
        return;
      }
      forwarded += d.length;
      upstream.write(d);
    });
    upstream.on('data', (d: Buffer) => client.write(d));
    for (const s of [client, upstream]) {
      s.on('error', () => undefined);
      s.on('close', () => {
        client.destroy();
        upstream.destroy();
      });
    }
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const a = server.address() as { port: number };
  return {
    address: `127.0.0.1:${a.port}`,
    server,
    get connections() {
      return state.connections;
    },
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

/** Runs one handoff through a faulty proxy with the given link credentials on both ends. */
async function handoffThrough(name: string, security: LinkSecurity, fault: Parameters<typeof faultyProxy>[1], extra: Parameters<typeof migrateOptions>[2] = {}) {
  const dest = await startDestination(ws, name, undefined, security);
  const proxy = await faultyProxy(dest.address, fault);
  // the sender actor takes its credentials from the environment we give it
  const saved = { ...process.env };
  for (const k of Object.values(LINK_ENV)) delete process.env[k];
  if (security.kind === 'psk') process.env[LINK_ENV.psk] = security.key.toString('hex');
  else process.env[LINK_ENV.insecure] = '1';
  try {
    const resultP = dest.receiver.next();
    const summary = await migrate(migrateOptions(ws, proxy.address, { bandwidthCapBps: 40e6, ...extra }));
    const received = summary.verified ? await resultP : undefined;
    return { summary, received, connections: proxy.connections, outDir: dest.outDir };
  } finally {
    for (const k of Object.values(LINK_ENV)) delete process.env[k];
    Object.assign(process.env, saved);
    await proxy.close();
    await dest.stop();
  }
}

async function assertIdentical(outDir: string): Promise<void> {
  assert.equal(await hashImageFile(join(outDir, 'memory.img')), await hashImageFile(ws.images.memory));
  assert.equal(await hashImageFile(join(outDir, 'disk.img')), await hashImageFile(ws.images.disk));
}

describe('WAN link: corruption and drops are survived', { timeout: 180_000 }, () => {
  test('plain TCP, a bit flipped in transit: the checksum catches it, the frame is sent again', async () => {
    const r = await handoffThrough('flip-plain', { kind: 'insecure' }, { flipAt: 200_000 }, { mode: { ...DEFAULT_MODE, compressor: 'none', level: 0 } });
    assert.equal(r.summary.verified, true, r.summary.reason);
    await assertIdentical(r.outDir);
    assert.ok(r.connections >= 2, 'the sender did not reconnect');
    assert.ok((r.summary.stages.sender?.counts.resentBytes ?? 0) > 0, 'no bytes were sent again');
    assert.ok((r.summary.stages.sender?.counts.reconnects ?? 0) >= 1);
  });

  test('TLS, a bit flipped in transit: TLS refuses the record, the link resumes', async () => {
    const r = await handoffThrough('flip-tls', psk(), { flipAt: 300_000 });
    assert.equal(r.summary.verified, true, r.summary.reason);
    await assertIdentical(r.outDir);
    assert.ok(r.connections >= 2);
  });

  test('connection cut mid-transfer: reconnects, resends only what was not acknowledged', async () => {
    const r = await handoffThrough('cut', psk(), { cutAt: 400_000 }, { mode: { ...DEFAULT_MODE, compressor: 'none', level: 0 } });
    assert.equal(r.summary.verified, true, r.summary.reason);
    await assertIdentical(r.outDir);
    // what was resent is what the sender had written but not yet seen acknowledged: at most its window
    const resent = r.summary.stages.sender?.counts.resentBytes ?? 0;
    assert.ok(resent > 0 && resent <= 3 * 1024 * 1024, `resent ${resent} of ${r.summary.wireBytes} bytes`);
  });

  test('link gone for good: fails at the deadline, naming it, and leaves no image', async () => {
    const started = performance.now();
    const r = await handoffThrough('gone', psk(), { cutAt: 300_000, refuseAfterCut: true }, { linkDeadlineMs: 3000, mode: { ...DEFAULT_MODE, compressor: 'none', level: 0 } });
    assert.equal(r.summary.verified, false);
    assert.match(r.summary.reason!, /lost and not back within 3 s/);
    assert.ok(performance.now() - started < 60_000);
    assert.equal(existsSync(join(r.outDir, 'memory.img')), false);
  });
});
