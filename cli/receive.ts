/** `handoff receive`: the destination cloudlet for one migration; exits 0 when the images are verified. */
import { startEmbeddedNats, type EmbeddedNats } from '../shared/nats-server.js';
import { startReceiver, type ReceivedMigration, type RunningReceiver } from '../services/receiver/service.js';

export interface ReceiveOptions {
  listen: string;
  baseMemory: string;
  baseDisk: string;
  outDir: string;
  natsUrl?: string;
  /** called once listening, with the bound address (port 0 picks one) */
  onListening?: (address: { host: string; port: number }) => void;
}

export async function receiveOnce(options: ReceiveOptions): Promise<ReceivedMigration> {
  let nats: EmbeddedNats | undefined;
  let receiver: RunningReceiver | undefined;
  try {
    if (!options.natsUrl) nats = await startEmbeddedNats();
    receiver = await startReceiver({ ...options, natsUrl: options.natsUrl ?? nats!.url });
    options.onListening?.(receiver.address);
    return await receiver.next();
  } finally {
    await receiver?.stop();
    await nats?.stop();
  }
}
