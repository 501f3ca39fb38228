/** The tuner's estimator and pure policy on a synthetic profile of this test's own: behaviour, not crossovers of a shipped profile. */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { tunerConfig } from '../../services/tuner/config.js';
import { Estimator, type Estimates } from '../../services/tuner/estimator.js';
import { modeKey, type Conditions, type Profile } from '../../services/tuner/model.js';
import { INITIAL_POLICY_STATE, decide, type PolicyState } from '../../services/tuner/policy.js';
import type { Mode } from '../../shared/model/mode.js';
import { stageStats as stats } from './fixtures/tuner-profile.js';

const RAW: Mode = { delta: 'none', compressor: 'none', level: 0 };
const FAST: Mode = { delta: 'none', compressor: 'lz4', level: 0 };
const MEDIUM: Mode = { delta: 'patch', compressor: 'zstd', level: 3 };
const STRONG: Mode = { delta: 'patch', compressor: 'zstd', level: 19 };

/** Four modes, each stronger one costlier: 0, 0.02, 0.1 and 1 ms a block for ratios 1, 0.6, 0.4 and 0.3. */
const FIXTURE: Profile = {
  workload: 'synthetic: four modes in the shape of real ones',
  createdAt: '2026-12-07',
  fixedCpuMsPerBlock: 0.05,
  modes: [
    { mode: RAW, deltaCpuMsPerBlock: 0, compressCpuMsPerBlock: 0, ratio: 1 },
    { mode: FAST, deltaCpuMsPerBlock: 0, compressCpuMsPerBlock: 0.02, ratio: 0.6 },
    { mode: MEDIUM, deltaCpuMsPerBlock: 0.1, compressCpuMsPerBlock: 0, ratio: 0.4 },
    { mode: STRONG, deltaCpuMsPerBlock: 1, compressCpuMsPerBlock: 0, ratio: 0.3 },
  ],
};

/** steady figures: no warm-up factor, no prior for CPU no stage reports (this test gives what it measures) */
const CONFIG = tunerConfig({ warmupCpuFactor: 1, priorOverheadCpuMsPerBusPage: 0 });

const at = (bandwidthMbit: number, spareCores = 1, compressWorkers = 1): Conditions => ({ bandwidthBps: bandwidthMbit * 1e6, spareCores, compressWorkers });

/** the mode a first look goes to from `start` (the start mode where it stays) */
function firstChoice(estimates: Estimates, conditions: Conditions, start: Mode = MEDIUM): string {
  const { decision } = decide(INITIAL_POLICY_STATE, estimates, start, conditions, 0, CONFIG);
  return modeKey(decision?.to ?? start);
}

const profiled = (): Estimates => new Estimator(FIXTURE, CONFIG).estimates();


describe('tuner policy on a synthetic profile', () => {
  test('a slow link chooses stronger compression, a fast one cheaper', () => {
    assert.equal(firstChoice(profiled(), at(2)), modeKey(STRONG));
    assert.equal(firstChoice(profiled(), at(2), RAW), modeKey(STRONG));
    assert.equal(firstChoice(profiled(), at(10_000)), modeKey(RAW));
    // the order holds in between: the chosen mode's ratio never grows as the link slows down
    const ratioOf = (key: string): number => FIXTURE.modes.find((m) => modeKey(m.mode) === key)!.ratio;
    const ratios = [10_000, 1000, 200, 50, 10, 2].map((mbit) => ratioOf(firstChoice(profiled(), at(mbit))));
    for (let i = 1; i < ratios.length; i++) assert.ok(ratios[i]! <= ratios[i - 1]!, `ratios by falling bandwidth: ${ratios.join(', ')}`);
  });

  test('a starved CPU chooses cheaper modes at the same bandwidth', () => {
    const cpuOf = (key: string): number => {
      const m = FIXTURE.modes.find((p) => modeKey(p.mode) === key)!;
      return m.deltaCpuMsPerBlock + m.compressCpuMsPerBlock;
    };
    const roomy = firstChoice(profiled(), at(100, 2));
    const starved = firstChoice(profiled(), at(100, 0.1));
    assert.ok(cpuOf(starved) < cpuOf(roomy), `2 cores: ${roomy}, a tenth of one: ${starved}`);
  });

  test('noise around a crossover causes no flapping', () => {
    // the bandwidth where FAST and MEDIUM predict the same, on one core
    const rate = (mode: Mode, mbit: number): number => decide(INITIAL_POLICY_STATE, profiled(), mode, at(mbit), 0, CONFIG).look.current!.blocksPerSec;
    let lo = 1;
    let hi = 10_000;
    for (let i = 0; i < 60; i++) {
      const mid = Math.sqrt(lo * hi);
      if (rate(MEDIUM, mid) > rate(FAST, mid)) lo = mid;
      else hi = mid;
    }
    const crossover = lo;
    let state: PolicyState = INITIAL_POLICY_STATE;
    let mode = MEDIUM;
    let switches = 0;
    // 40 looks with the bandwidth 10% either side of it, as a noisy ACK figure reads
    for (let look = 0; look < 40; look++) {
      const r = decide(state, profiled(), mode, at(crossover * (look % 2 === 0 ? 0.9 : 1.1)), look * 500, CONFIG);
      state = r.state;
      if (r.decision) {
        mode = r.decision.to;
        switches++;
      }
    }
    assert.ok(switches <= 1, `${switches} switches`);
  });

  test('a real change is followed, after the confirmations asked for', () => {
    let state: PolicyState = decide(INITIAL_POLICY_STATE, profiled(), STRONG, at(2), 0, CONFIG).state;
    // the link speeds up 2 -> 50 Mbit/s: STRONG is CPU-bound there, MEDIUM about twice as fast
    const first = decide(state, profiled(), STRONG, at(50), 500, CONFIG);
    const gain = decide(INITIAL_POLICY_STATE, profiled(), MEDIUM, at(50), 0, CONFIG).look.current!.blocksPerSec / first.look.current!.blocksPerSec;
    if (gain <= 1 + CONFIG.clearGainFactor * CONFIG.hysteresis) {
      assert.equal(first.decision, undefined, 'switched on one look');
      state = first.state;
      const second = decide(state, profiled(), STRONG, at(50), 1000, CONFIG);
      assert.equal(modeKey(second.decision!.to), modeKey(MEDIUM));
    } else assert.ok(first.decision, `a clear gain (${gain.toFixed(2)}x) is taken at once`);
  });

  test('a mode whose measured cost departs from its profile is re-ranked', () => {
    // at 20 Mbit/s on one core MEDIUM is the best as profiled
    assert.equal(firstChoice(profiled(), at(20), RAW), modeKey(MEDIUM));
    const estimator = new Estimator(FIXTURE, CONFIG);
    // FAST ran first, at its profile's cost
    for (let i = 0; i < 8; i++) estimator.observe({ ...stats('compress', FAST, 256, 256 * 0.02, 256 * 4096 * 0.6, 'wire'), counts: { blocks: 256, codecCpuMs: 256 * 0.02 } });
    // here MEDIUM costs sixteen times its profile, its codec measured apart from the stage's handling
    for (let i = 0; i < 8; i++) estimator.observe({ ...stats('delta', MEDIUM, 256, 256 * 1.6, 256 * 4096 * 0.4, 'wire'), counts: { blocks: 256, codecCpuMs: 256 * 1.6 } });
    const measured = estimator.estimates();
    const medium = measured.costs.find((c) => modeKey(c.mode) === modeKey(MEDIUM))!;
    assert.ok(Math.abs(medium.deltaCpuMsPerBlock - 1.6) < 1e-9, `measured ${medium.deltaCpuMsPerBlock}`);
    // STRONG, never run, is priced at its profile times MEDIUM's scale
    const strong = measured.costs.find((c) => modeKey(c.mode) === modeKey(STRONG))!;
    assert.ok(Math.abs(strong.deltaCpuMsPerBlock - 16) < 1e-9, `scaled ${strong.deltaCpuMsPerBlock}`);
    const chosen = firstChoice(measured, at(20), MEDIUM);
    assert.equal(chosen, modeKey(FAST), 'MEDIUM, costly here, is left for the cheaper mode that now wins');
  });

  test('the policy is pure: the same state and estimates give the same decision, and nothing passed in changes', () => {
    const state = Object.freeze({ ...INITIAL_POLICY_STATE });
    const estimates = profiled();
    const before = JSON.stringify(estimates);
    const a = decide(state, estimates, MEDIUM, at(2), 0, CONFIG);
    const b = decide(state, estimates, MEDIUM, at(2), 0, CONFIG);
    assert.deepEqual(a, b);
    assert.equal(JSON.stringify(estimates), before);
    assert.equal(state.looks, 0);
    assert.equal(a.state.looks, 1);
  });
});
