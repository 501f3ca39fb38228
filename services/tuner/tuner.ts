/**
 * One migration's tuner: its estimator, and the policy's state between looks. The decisions are the
 * pure policy's (policy.ts); this holds what they carry from one look to the next.
 */
import type { Mode } from '../../shared/model/mode.js';
import { tunerConfig, type TunerConfig } from './config.js';
import { Estimator } from './estimator.js';
import { rank, type Conditions, type Prediction, type Profile } from './model.js';
import { INITIAL_POLICY_STATE, decide, workersFor, workersWanted, type Decision, type Look, type PolicyState } from './policy.js';

export class Tuner {
  readonly config: TunerConfig;
  readonly estimator: Estimator;
  private policy: PolicyState = INITIAL_POLICY_STATE;
  /** what the last look saw (the debug log, the config's compression for other deltas) */
  lastLook: Look | undefined;

  constructor(profile: Profile, config: Partial<TunerConfig> = {}) {
    this.config = tunerConfig(config);
    this.estimator = new Estimator(profile, this.config);
  }

  /** every mode's prediction now, fastest first, without a look (nothing counted, nothing decided) */
  predictNow(conditions: Conditions): Prediction[] {
    return rank(this.estimator.costs(), this.estimator.fixedCpuMsPerBlock, conditions);
  }

  /** A look: a decision to switch away from `current`, or undefined to stay. */
  decide(current: Mode, conditions: Conditions, nowMs: number): Decision | undefined {
    const result = decide(this.policy, this.estimator.estimates(), current, conditions, nowMs, this.config);
    this.policy = result.state;
    this.lastLook = result.look;
    return result.decision;
  }

  /** the compress workers `mode` needs now, with no memory of earlier looks */
  workersFor(mode: Mode, conditions: Conditions): number {
    return workersFor(this.estimator.estimates(), mode, conditions, this.config);
  }

  /** the compress workers to use now (see policy.ts workersWanted) */
  workersWanted(mode: Mode, conditions: Conditions, linkBoundShare?: number): number {
    const result = workersWanted(this.policy, this.estimator.estimates(), mode, conditions, linkBoundShare, this.config);
    this.policy = result.state;
    return result.workers;
  }
}
