/** Compress actor: N processes share one work queue; each compresses on its own worker thread. */
import { Piscina } from 'piscina';
import { compressionFor } from '../../shared/model/mode.js';
import { nextStage, type StageActor } from '../../shared/actor/stage.js';
import type { CompressResult, CompressTask } from './worker.js';

export function createCompressActor(threads = 1): StageActor {
  const pool = new Piscina<CompressTask, CompressResult>({
    filename: new URL('./worker.js', import.meta.url).href,
    minThreads: threads,
    maxThreads: threads,
  });
  return {
    name: 'compress',
    input: 'compress',
    // one chunk compressing, one being received/published: keeps the thread busy
    concurrency: threads + 1,
    // the tuner chooses how many compress workers are in use
    gated: true,
    async handle(chunk, ctx) {
      // a chunk delta-encoded under an earlier mode gets the compression the tuner picks for its delta
      const mode = compressionFor(ctx.mode, chunk.mode.delta);
      const { chunk: out, codecCpuMs } = await pool.run({ chunk, mode });
      // the codec's own CPU beside the stage's: the tuner tells the codec's cost (which differs per
      // mode) from the handling every chunk costs (which does not)
      return { outputs: [{ chunk: out, to: nextStage('compress', mode, out) }], ...(codecCpuMs !== undefined ? { counts: { codecCpuMs } } : {}) };
    },
    async close() {
      await pool.destroy();
    },
  };
}
