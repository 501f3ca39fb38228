/** zstd-napi's low-level binding (CJS without named exports for ESM): contexts we can size and reuse. */
import { createRequire } from 'node:module';

type ZstdBinding = typeof import('zstd-napi/binding.js');
export const zstd: ZstdBinding = createRequire(import.meta.url)('zstd-napi/binding.js') as ZstdBinding;
