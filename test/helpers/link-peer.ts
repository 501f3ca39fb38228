/** A hand-driven source end of the WAN link, for tests that send what a real sender never would. */
import { dialLink, linkSecurityFromEnv, type LinkSecurity } from '../../shared/wire/link-security.js';
import { FrameReader, parseAddress, type Frame } from '../../shared/wire/frames.js';

/** Sends raw bytes to a receiver and collects the frames it answers until it closes the link (or 5 s). */
export async function talk(address: string, data: Buffer[], security: LinkSecurity = linkSecurityFromEnv()): Promise<Frame[]> {
  const { host, port } = parseAddress(address);
  const socket = await dialLink(host, port, security, 5000);
  const reader = new FrameReader();
  const got: Frame[] = [];
  socket.on('data', (d: Buffer) => got.push(...reader.push(d)));
  socket.on('error', () => undefined);
  for (const d of data) socket.write(d);
  await new Promise<void>((resolve) => {
    socket.once('close', () => resolve());
    setTimeout(() => {
      socket.destroy();
      resolve();
    }, 5000).unref();
  });
  return got;
}
