/** Delta actor: reads base pages at the same index from the base files on this cloudlet. */
import { closeSync, openSync, readSync } from 'node:fs';
import { PAGE_SIZE, type ImageId } from '../../shared/image/pages.js';
import { nextStage, type StageActor } from '../../shared/actor/stage.js';
import { threadCpuMs } from '../../shared/cpu/thread-cpu.js';
import { DeltaEncoder } from './core.js';

export function createDeltaActor(): StageActor {
  const encoders = new Map<string, { encoder: DeltaEncoder; fds: number[] }>();
  return {
    name: 'delta',
    input: 'delta',
    async prepare(d) {
      const fds = [openSync(d.memory.base, 'r'), openSync(d.disk.base, 'r')];
      const readBasePage = (image: ImageId, index: number): Uint8Array => {
        const page = Buffer.allocUnsafe(PAGE_SIZE);
        const n = readSync(fds[image]!, page, 0, PAGE_SIZE, index * PAGE_SIZE);
        if (n !== PAGE_SIZE) throw new Error(`base ${image === 0 ? d.memory.base : d.disk.base}: page ${index} is past its end`);
        return page;
      };
      encoders.set(d.migrationId, { encoder: new DeltaEncoder(readBasePage, threadCpuMs), fds });
    },
    handle(chunk, ctx) {
      const { encoder } = encoders.get(chunk.migrationId)!;
      const { chunk: out, counts } = encoder.encode(chunk, ctx.mode.delta, ctx.mode.level);
      return { outputs: [{ chunk: out, to: nextStage('delta', ctx.mode, out) }], counts: { ...counts } };
    },
    forget(migrationId) {
      encoders.get(migrationId)?.fds.forEach((fd) => closeSync(fd));
      encoders.delete(migrationId);
    },
    async close() {
      for (const { fds } of encoders.values()) fds.forEach((fd) => closeSync(fd));
    },
  };
}
