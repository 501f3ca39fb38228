/**
 * What the sender tells of a migration's WAN link: control for the tuner and the progress line,
 * not statistics to add up. Its own typed message on its own subject (`linkSubject`), so nothing
 * reads a bandwidth out of a map of counters.
 */
import { MalformedMessageError } from './errors.js';
import { amount, object, parseJson, text } from './validate.js';

export type LinkReport =
  /** the link probe's reading, before any chunk: the tuner's first look at the link */
  | { type: 'probed'; migrationId: string; bandwidthBps: number }
  /** the link as the receiver's acknowledgements show it, sent with each acknowledged chunk */
  | {
      type: 'measured';
      migrationId: string;
      /** the link's current bandwidth; absent until measured */
      bandwidthBps?: number;
      /** since the link's first chunk */
      averageBandwidthBps: number;
      /** the share of the time the lane had chunks to send and the link was what held them (0..1) */
      linkBoundShare: number;
    };

export function encodeLinkReport(report: LinkReport): Uint8Array {
  return Buffer.from(JSON.stringify(report));
}

/** A link report off the bus, checked field by field. */
export function parseLinkReport(bytes: Uint8Array | string): LinkReport {
  const o = object(parseJson(typeof bytes === 'string' ? bytes : Buffer.from(bytes).toString('utf8'), 'link report'), 'link report');
  const migrationId = text(o.migrationId, 'link report: migrationId', 128);
  switch (o.type) {
    case 'probed':
      return { type: 'probed', migrationId, bandwidthBps: amount(o.bandwidthBps, 'link report: bandwidthBps') };
    case 'measured': {
      const linkBoundShare = amount(o.linkBoundShare, 'link report: linkBoundShare');
      if (linkBoundShare > 1) throw new MalformedMessageError(`link report: linkBoundShare ${linkBoundShare} is more than 1`);
      return {
        type: 'measured',
        migrationId,
        ...(o.bandwidthBps !== undefined ? { bandwidthBps: amount(o.bandwidthBps, 'link report: bandwidthBps') } : {}),
        averageBandwidthBps: amount(o.averageBandwidthBps, 'link report: averageBandwidthBps'),
        linkBoundShare,
      };
    }
    default:
      throw new MalformedMessageError(`link report: unknown type ${JSON.stringify(o.type)?.slice(0, 40)}`);
  }
}
