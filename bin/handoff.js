#!/usr/bin/env node
// Entry point: the compiled CLI (run `npm run build`, or ./run setup, first).
import('../dist/cli/main.js').catch((err) => {
  if (err && err.code === 'ERR_MODULE_NOT_FOUND' && String(err.message).includes('dist/cli/main.js')) {
    console.error('handoff is not built yet: run `npm run build` (or `./run setup`) in the repository first');
    process.exit(2);
  }
  throw err;
});
