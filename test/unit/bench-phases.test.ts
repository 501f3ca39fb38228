import assert from 'node:assert/strict';
import { test } from 'node:test';
import { oracleSeconds, phaseProgress, type Phase } from '../../load/lib/phases.js';

const PHASES: Phase[] = [
  { label: 'slow', startSeconds: 0 },
  { label: 'fast', startSeconds: 10 },
  { label: 'slow again', startSeconds: 11 },
];

test('phaseProgress splits a run by the link counter as each phase began, at the run own input/wire ratio', () => {
  // 1 MB in the first 10 s, 4 MB in the fast second (its timer a little late), 1 MB more by 14 s; input twice the wire
  const starts = [
    { atSeconds: 0, sentBytes: 100 },
    { atSeconds: 10.05, sentBytes: 100 + 1e6 },
    { atSeconds: 11.05, sentBytes: 100 + 5e6 },
  ];
  const p = phaseProgress(PHASES, starts, { atSeconds: 14.05, sentBytes: 100 + 6e6 }, 12e6);
  assert.deepEqual(p.map((x) => [x.label, x.seconds, x.wireBytes, x.inputBytes]), [
    ['slow', 10.05, 1e6, 2e6],
    ['fast', 1, 4e6, 8e6],
    ['slow again', 3, 1e6, 2e6],
  ]);
  assert.equal(p[1]!.inputBps, 8e6);
});

test('phaseProgress leaves out the phases begun after the end, and ends the last reached with the run', () => {
  // the timer of the third phase fired after the transfer had ended at 10.5 s
  const starts = [{ atSeconds: 0, sentBytes: 0 }, { atSeconds: 10, sentBytes: 5e5 }, { atSeconds: 11, sentBytes: 2e6 }];
  const p = phaseProgress(PHASES, starts, { atSeconds: 10.5, sentBytes: 2e6 }, 2e6);
  assert.deepEqual(p.map((x) => [x.label, x.seconds, x.inputBytes]), [
    ['slow', 10, 5e5],
    ['fast', 0.5, 1.5e6],
  ]);
});

test('oracleSeconds moves the input through the phases at each one rate, the last without end', () => {
  // 1 MB/s for 10 s, 10 MB/s for 1 s, then 1 MB/s: 30 MB ends at 11 + 10 s
  assert.equal(oracleSeconds(PHASES, [1e6, 1e7, 1e6], 30e6), 21);
  // done inside the fast phase
  assert.equal(oracleSeconds(PHASES, [1e6, 1e7, 1e6], 15e6), 10.5);
  // a faster first phase only shortens the last
  assert.ok(oracleSeconds(PHASES, [1.1e6, 1e7, 1e6], 30e6) < 21);
  assert.equal(oracleSeconds(PHASES, [0, 0, 0], 1), Infinity);
});
