/** Errors that name their cause: what users see instead of a crash or a wrong image. */

/** A chunk or frame that does not decode or fails validation. */
export class MalformedMessageError extends Error {
  override name = 'MalformedMessageError';
}

/** An input image that cannot be handed off as given. */
export class BadImageError extends Error {
  override name = 'BadImageError';
}

/** The destination's base VM is not the source's. */
export class BaseMismatchError extends Error {
  override name = 'BaseMismatchError';
}

/** The destination refused the migration before any page moved (another base, sizes, no VM support), naming why. */
export class RefusedError extends Error {
  override name = 'RefusedError';
}

/** The rebuilt image does not match what the source read. */
export class VerificationError extends Error {
  override name = 'VerificationError';
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
