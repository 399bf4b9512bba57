'use strict';
// EngramError: the one error type the client's promises reject with.

const grpc = require('@grpc/grpc-js');

const CODE_NAMES = {};
for (const [name, value] of Object.entries(grpc.status)) {
  if (typeof value === 'number') CODE_NAMES[value] = name;
}

/**
 * A failed Engram call. `code` is the gRPC status number (5), `codeName` its
 * name ("NOT_FOUND") and `details` the server's message verbatim; `message`
 * reads "NOT_FOUND: <details>". Arguments the client rejects before sending
 * anything carry INVALID_ARGUMENT and `attempts` 0.
 */
class EngramError extends Error {
  /**
   * @param {number} code gRPC status code
   * @param {string} details the server's (or the client's) message
   * @param {object} [extra]
   * @param {string} [extra.method] the RPC, e.g. "Retrieve"
   * @param {number} [extra.attempts] calls made, retries included
   * @param {import('@grpc/grpc-js').Metadata} [extra.metadata] trailing metadata
   * @param {Error} [extra.cause] the underlying @grpc/grpc-js error
   */
  constructor(code, details, extra = {}) {
    const codeName = CODE_NAMES[code] || `CODE_${code}`;
    super(`${codeName}: ${details}`, extra.cause ? { cause: extra.cause } : undefined);
    this.name = 'EngramError';
    this.code = code;
    this.codeName = codeName;
    this.details = details;
    this.method = extra.method;
    this.attempts = extra.attempts === undefined ? 0 : extra.attempts;
    this.metadata = extra.metadata;
  }

  /**
   * Wraps an error of @grpc/grpc-js (or any thrown value) as an EngramError;
   * values without a numeric gRPC code become UNKNOWN.
   * @param {any} err the error to wrap
   * @param {string} method the RPC that failed
   * @param {number} attempts calls made, retries included
   * @returns {EngramError}
   */
  static fromGrpc(err, method, attempts) {
    if (err instanceof EngramError) return err;
    const code = err && typeof err.code === 'number' ? err.code : grpc.status.UNKNOWN;
    const details = err && typeof err.details === 'string' ? err.details
      : (err && err.message) || String(err);
    return new EngramError(code, details, { method, attempts, metadata: err && err.metadata, cause: err });
  }
}

/**
 * An INVALID_ARGUMENT EngramError for an argument the client rejects before
 * sending a request.
 * @param {string} message what is wrong
 * @returns {EngramError}
 */
function argumentError(message) {
  return new EngramError(grpc.status.INVALID_ARGUMENT, message, { attempts: 0 });
}

module.exports = { EngramError, argumentError, CODE_NAMES };
