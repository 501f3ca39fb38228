/** Compress actor: N processes share one work queue; each compresses on its own worker thread. */
import { Piscina } from 'piscina';
import type { Chunk } from '../../shared/chunk.js';
import { nextStage, type StageActor } from '../../shared/stage.js';
import type { CompressTask } from './worker.js';

export function createCompressActor(threads = 1): StageActor {
  const pool = new Piscina<CompressTask, Chunk>({
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
      const out = await pool.run({ chunk, mode: ctx.mode });
      return { outputs: [{ chunk: out, to: nextStage('compress', ctx.mode, out) }] };
    },
    async close() {
      await pool.destroy();
    },
  };
}
