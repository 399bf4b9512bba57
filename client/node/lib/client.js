'use strict';
// Client: promise methods over the engram.v1.MemoryService RPCs.

const grpc = require('@grpc/grpc-js');
const { load } = require('./proto');
const { EngramError, argumentError } = require('./errors');
const c = require('./convert');

/** The defaults of the Client options. */
const DEFAULTS = Object.freeze({
  timeoutMs: 30000,
  retries: 3,
  backoffMs: 100,
  maxBackoffMs: 5000,
});

/** Frames a SampleStream holds for a slow reader before it pauses the call. */
const STREAM_HIGH_WATER = 16;

/** Resolves after `ms` milliseconds. */
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Returns `value` when it is a number >= 0; throws a TypeError otherwise. */
function nonNegative(value, what) {
  if (typeof value !== 'number' || !(value >= 0)) {
    throw new TypeError(`engram-client: ${what} must be a non-negative number, got ${value}`);
  }
  return value;
}

/**
 * Reads a server-streaming call as pulled promises, pausing the call while
 * STREAM_HIGH_WATER messages wait to be read.
 */
class StreamReader {
  constructor(call) {
    this.call = call;
    this.buffer = [];
    this.error = null;
    this.ended = false;
    this.wake = null;
    call.on('data', (m) => {
      this.buffer.push(m);
      if (this.buffer.length >= STREAM_HIGH_WATER) call.pause();
      this.notify();
    });
    // Stays attached for the life of the call, so a late error (such as the
    // CANCELLED that follows cancel()) is never an unhandled 'error' event.
    call.on('error', (e) => {
      if (!this.ended) this.error = e;
      this.notify();
    });
    call.on('end', () => {
      this.ended = true;
      this.notify();
    });
  }

  notify() {
    const wake = this.wake;
    this.wake = null;
    if (wake) wake();
  }

  /**
   * @returns {Promise<object|undefined>} the next message, undefined at the
   *   end of the stream; rejects with the call's error once the messages
   *   received before it are read
   */
  async next() {
    for (;;) {
      if (this.buffer.length > 0) {
        const m = this.buffer.shift();
        if (this.buffer.length < STREAM_HIGH_WATER / 2) this.call.resume();
        return m;
      }
      if (this.error) throw this.error;
      if (this.ended) return undefined;
      await new Promise((resolve) => { this.wake = resolve; });
    }
  }
}

/**
 * A client of one engramd server (one gRPC channel).
 *
 * Every method returns a promise that rejects with an {@link EngramError}.
 * Calls answered UNAVAILABLE (server unreachable or restarting) are retried
 * up to `retries` times with jittered exponential backoff; no other code is
 * retried. A retried Store that had in fact committed answers ALREADY_EXISTS
 * when it carries ids (read them back with getPatterns), but stores the
 * patterns twice when the server assigns the ids.
 *
 * Thread-safety: one Client may be shared by any number of concurrent calls.
 */
class Client {
  /**
   * @param {string} [target="127.0.0.1:50051"] host:port of engramd
   * @param {object} [options]
   * @param {string} [options.token] bearer token, sent as
   *   "authorization: Bearer <token>" metadata on every call
   * @param {boolean} [options.tls=false] connect with TLS (implied by rootCerts)
   * @param {Buffer|string} [options.rootCerts] PEM roots that verify the
   *   server's certificate; the system roots when omitted
   * @param {number} [options.timeoutMs=30000] deadline of each attempt of a
   *   call (a whole stream for sampleStream); 0 means none
   * @param {number} [options.retries=3] retries after a first attempt answered
   *   UNAVAILABLE, so a call makes at most retries + 1 attempts
   * @param {number} [options.backoffMs=100] base of the backoff: retry r waits
   *   a uniformly random time in [d/2, d], d = min(maxBackoffMs, backoffMs * 2^(r-1))
   * @param {number} [options.maxBackoffMs=5000] ceiling of the backoff
   * @param {object} [options.channelOptions] extra @grpc/grpc-js channel options
   * @param {Array<Function>} [options.interceptors] @grpc/grpc-js client
   *   interceptors, run on every attempt
   */
  constructor(target = '127.0.0.1:50051', options = {}) {
    const o = { ...DEFAULTS, ...options };
    this.target = target;
    this._token = o.token === undefined || o.token === null || o.token === '' ? null : String(o.token);
    this._timeoutMs = nonNegative(o.timeoutMs, 'timeoutMs');
    this._retries = nonNegative(o.retries, 'retries');
    this._backoffMs = nonNegative(o.backoffMs, 'backoffMs');
    this._maxBackoffMs = nonNegative(o.maxBackoffMs, 'maxBackoffMs');
    this._closed = false;
    const credentials = o.tls || o.rootCerts
      ? grpc.credentials.createSsl(o.rootCerts ? Buffer.from(o.rootCerts) : null)
      : grpc.credentials.createInsecure();
    const clientOptions = {
      // engramd accepts messages up to 64 MiB by default (--max_message_bytes).
      'grpc.max_receive_message_length': 256 << 20,
      'grpc.max_send_message_length': 256 << 20,
      ...(o.channelOptions || {}),
    };
    if (o.interceptors) clientOptions.interceptors = o.interceptors;
    const { MemoryService } = load();
    this._stub = new MemoryService(target, credentials, clientOptions);
  }

  /**
   * Closes the channel. Calls in flight fail; later calls reject with
   * CANCELLED.
   * @returns {void}
   */
  close() {
    this._closed = true;
    this._stub.close();
  }

  // -------------------------------------------------------------------------
  // Banks

  /**
   * Creates an empty bank.
   * @param {string} name bank name, [a-z0-9][a-z0-9_.-]{0,63}
   * @param {number} dim dimension N of every pattern, in [1, 1048576]
   * @param {object} [options]
   * @param {string|number} [options.kind="continuous"] "continuous" or "bipolar"
   * @param {object|string} [options.energy] default energy: {family, beta,
   *   degree, rectified, similarity, separation} or just a family name;
   *   family defaults to "lse" (continuous) or "classical" (bipolar)
   * @param {string|number} [options.precision] "f32", "bf16", "bit_packed"
   *   or "f32_screened"
   * @param {number} [options.valueDim=0] dimension M of the value each
   *   pattern carries (a key -> value bank); 0 for none
   * @param {number|bigint} [options.ttlSeconds=0] default time to live of the
   *   bank's patterns; 0 for none
   * @param {number|bigint} [options.decayHalfLifeSeconds=0] half-life of a
   *   pattern's weight: one stored `age` ago weighs 2^(-age / half-life) in
   *   the softmax (softmax energies on continuous banks); 0 for no decay
   * @param {number} [options.timeoutMs] deadline of this call
   * @returns {Promise<object>} the new bank's BankInfo; rejects ALREADY_EXISTS
   *   when the name is taken, INVALID_ARGUMENT on a bad name, dim, kind or
   *   energy, FAILED_PRECONDITION for a family the kind does not accept
   */
  async createBank(name, dim, options = {}) {
    const reply = await this._unary('CreateBank', {
      name,
      dim,
      kind: c.enumIn('StateKind', options.kind === undefined ? 'continuous' : options.kind),
      energy: c.energyIn(options.energy),
      precision: c.enumIn('Precision', options.precision),
      valueDim: options.valueDim,
      ttlSeconds: c.optionalUint64In(options.ttlSeconds, 'ttlSeconds'),
      decayHalfLifeSeconds: c.optionalUint64In(options.decayHalfLifeSeconds,
                                               'decayHalfLifeSeconds'),
    }, options);
    return c.bankOut(reply);
  }

  /**
   * Describes one bank.
   * @param {string} name the bank
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<object>} its BankInfo; rejects NOT_FOUND if absent
   */
  async getBank(name, options = {}) {
    return c.bankOut(await this._unary('GetBank', { name }, options));
  }

  /**
   * Lists every bank, ordered by name.
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<object[]>} BankInfo of each bank
   */
  async listBanks(options = {}) {
    const reply = await this._unary('ListBanks', {}, options);
    return reply.banks.map(c.bankOut);
  }

  /**
   * Deletes a bank and all its patterns, durably.
   * @param {string} name the bank
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<void>} rejects NOT_FOUND if absent
   */
  async deleteBank(name, options = {}) {
    await this._unary('DeleteBank', { name }, options);
  }

  // -------------------------------------------------------------------------
  // Patterns

  /**
   * Stores a batch of patterns atomically.
   * @param {string} bank the bank
   * @param {Float32Array|number[]|number[][]} patterns K * N floats row-major,
   *   or K rows of N
   * @param {object} [options]
   * @param {number} [options.dim] the bank's dimension N, to check the batch
   *   shape before sending (the server checks it in any case)
   * @param {Array<bigint|number|string>} [options.ids] one id per pattern
   *   (uint64); the server assigns fresh ids when omitted
   * @param {Array<Buffer|Uint8Array|string>} [options.payloads] one payload
   *   per pattern, each at most 64 KiB
   * @param {Float32Array|number[]|number[][]} [options.values] K * M floats
   *   or K rows of M: one value per pattern, required by (and only allowed
   *   on) a bank with valueDim M > 0
   * @param {number} [options.valueDim] the bank's valueDim, to check the
   *   values' shape before sending
   * @param {Array<object|null>} [options.labels] one plain object per pattern:
   *   string values are string labels, integers (safe numbers or bigints)
   *   int64 labels; throws TypeError for any other value
   * @param {number|bigint} [options.ttlSeconds] time to live of these
   *   patterns; 0 or omitted: the bank's ttlSeconds
   * @param {number} [options.timeoutMs] deadline of this call
   * @returns {Promise<bigint[]>} the ids of the stored patterns, in order;
   *   rejects NOT_FOUND for an unknown bank, INVALID_ARGUMENT for a batch
   *   that is not a whole number of N-vectors (or not +-1 on a bipolar bank),
   *   values that are not K * M finite floats, bad labels; ALREADY_EXISTS
   *   for an id already in the bank. Nothing is stored when it rejects.
   */
  async store(bank, patterns, options = {}) {
    const reply = await this._unary('Store', {
      bank,
      patterns: c.floatsIn(patterns, 'patterns', options.dim),
      ids: c.uint64ListIn(options.ids, 'ids'),
      payloads: c.bytesListIn(options.payloads, 'payloads'),
      values: c.floatsIn(options.values, 'values', options.valueDim),
      labels: c.labelsIn(options.labels),
      ttlSeconds: c.optionalUint64In(options.ttlSeconds, 'ttlSeconds'),
    }, options);
    return reply.ids.map((id) => BigInt(id));
  }

  /**
   * Reads stored patterns back, by id or one page of the bank in storage
   * order when no id is given.
   * @param {string} bank the bank
   * @param {object} [options]
   * @param {Array<bigint|number|string>} [options.ids] ids to read
   * @param {number|bigint} [options.pageStart=0] first row of the page
   * @param {number} [options.pageSize=1000] rows per page
   * @param {number} [options.timeoutMs] deadline of this call
   * @returns {Promise<{dim: number, ids: bigint[], patterns: Float32Array,
   *   payloads: Buffer[], values: Float32Array, labels: object[],
   *   expiresUnixMs: number[], storedUnixMs: number[], nextPageStart: number}>}
   *   patterns and values
   *   (ids.length * M floats, empty without values) bit for bit as stored;
   *   one labels object per id (int labels as bigints); the Unix time in ms
   *   at which each pattern expires, 0 for never (an expired pattern stays
   *   here until the server's expiry sweep removes it), and at which it was
   *   stored (its age for decay; 0: not recorded). Rejects NOT_FOUND if
   *   the bank or any id is absent
   */
  async getPatterns(bank, options = {}) {
    const reply = await this._unary('GetPatterns', {
      bank,
      ids: c.uint64ListIn(options.ids, 'ids'),
      pageStart: c.optionalUint64In(options.pageStart, 'pageStart'),
      pageSize: options.pageSize,
    }, options);
    return {
      dim: reply.dim,
      ids: reply.ids.map((id) => BigInt(id)),
      patterns: c.floatsOut(reply.patterns),
      payloads: reply.payloads,
      values: c.floatsOut(reply.values),
      labels: reply.labels.map(c.labelsOut),
      expiresUnixMs: reply.expiresUnixMs.map(Number),
      storedUnixMs: reply.storedUnixMs.map(Number),
      nextPageStart: Number(reply.nextPageStart),
    };
  }

  /**
   * Deletes patterns by id, atomically.
   * @param {string} bank the bank
   * @param {Array<bigint|number|string>} ids distinct ids, all present
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<{deleted: number, bankPatterns: number}>} rejects
   *   NOT_FOUND (and deletes nothing) if any id is absent
   */
  async deletePatterns(bank, ids, options = {}) {
    const reply = await this._unary('DeletePatterns', { bank, ids: c.uint64ListIn(ids, 'ids') }, options);
    return { deleted: Number(reply.deleted), bankPatterns: Number(reply.bankPatterns) };
  }

  // -------------------------------------------------------------------------
  // Compute

  /**
   * Content-addressable recall: runs the energy-descent dynamics from each
   * query.
   * @param {string} bank the bank
   * @param {Float32Array|number[]|number[][]} queries B * N floats row-major,
   *   or B rows of N
   * @param {object} [options]
   * @param {number} [options.dim] the bank's dimension, to check the shape
   * @param {object|string} [options.energy] overrides the bank's energy
   * @param {string|number} [options.dynamics="sync"] "sync", "async",
   *   "gradient" or "tinybrain"
   * @param {number} [options.maxSteps] at most this many steps (0: 100)
   * @param {number} [options.tol] convergence threshold (0: 1e-6)
   * @param {number} [options.alpha] GRADIENT step size
   * @param {number} [options.dt] TINYBRAIN Euler step
   * @param {number} [options.tauV] TINYBRAIN time constant
   * @param {number} [options.tauH] TINYBRAIN time constant
   * @param {bigint|number|string} [options.seed] ASYNC neuron order seed
   * @param {boolean} [options.returnTrace] report the energy after every step
   * @param {boolean} [options.partialOnDeadline] return partial states when
   *   the deadline passes
   * @param {ArrayLike<boolean|number>} [options.clamp] N or B * N flags of
   *   coordinates held at their query values
   * @param {number} [options.queueTimeoutMs] longest wait in the server queue
   * @param {object} [options.filter] only the patterns whose labels pass
   *   (see "Filters" in README.md): {key: "en" | 7 | ["a", "b"] | [1, 2] |
   *   {min, max}}, ANDed; throws TypeError for a test of no such form
   * @param {number} [options.timeoutMs] deadline of this call
   * @returns {Promise<object[]>} one RetrieveResult per query, with `state`
   *   a Float32Array and, on a bank with values, `value` the M floats of the
   *   readout sum_mu p_mu v_mu at the final state (null without values);
   *   rejects NOT_FOUND for an unknown bank, INVALID_ARGUMENT for queries
   *   that are not whole N-vectors or a malformed filter,
   *   FAILED_PRECONDITION when no pattern passes the filter
   */
  async retrieve(bank, queries, options = {}) {
    const reply = await this._unary('Retrieve', {
      bank,
      queries: c.floatsIn(queries, 'queries', options.dim),
      energy: c.energyIn(options.energy),
      options: {
        dynamics: c.enumIn('Dynamics', options.dynamics),
        maxSteps: options.maxSteps,
        tol: options.tol,
        alpha: options.alpha,
        dt: options.dt,
        tauV: options.tauV,
        tauH: options.tauH,
        seed: c.optionalUint64In(options.seed, 'seed'),
        returnTrace: options.returnTrace,
        partialOnDeadline: options.partialOnDeadline,
      },
      clamp: c.boolsIn(options.clamp, 'clamp'),
      queueTimeoutMs: options.queueTimeoutMs,
      filter: c.filterIn(options.filter),
    }, options);
    return reply.results.map(c.retrieveResultOut);
  }

  /**
   * Evaluates the energy, and optionally its gradient, at a batch of states.
   * @param {string} bank the bank
   * @param {Float32Array|number[]|number[][]} states B * N floats or B rows
   * @param {object} [options]
   * @param {number} [options.dim] the bank's dimension, to check the shape
   * @param {boolean} [options.gradient=false] also return grad E
   * @param {object|string} [options.energy] overrides the bank's energy
   * @param {number} [options.queueTimeoutMs] longest wait in the server queue
   * @param {object} [options.filter] only the patterns whose labels pass
   *   (see "Filters" in README.md): {key: "en" | 7 | ["a", "b"] | [1, 2] |
   *   {min, max}}, ANDed; throws TypeError for a test of no such form
   * @param {boolean} [options.novelty=false] also return each state's
   *   novelty relative to the bank's own memories (see "Novelty" in README.md)
   * @param {number} [options.timeoutMs] deadline of this call
   * @returns {Promise<{energies: number[], gradients: Float32Array|null,
   *   values: Float32Array|null, novelty: Float64Array|null,
   *   noveltyZ: Float64Array|null}>} one energy (double) per state; B * N
   *   gradient floats when requested; on a bank with values, B * M floats
   *   row-major: the readout at each state (one attention step), else null;
   *   with `novelty`, B doubles each: `novelty`, the fraction of the stored
   *   patterns' own energies below the state's energy (equal ones counting
   *   half) over min(K, 256) stored patterns (those whose ids hash
   *   smallest) under the same energy and filter, near 1 far from
   *   every memory; `noveltyZ`, (E(x) - mean) / population standard
   *   deviation of those energies (0 when all are equal); else both null
   */
  async energy(bank, states, options = {}) {
    const reply = await this._unary('Energy', {
      bank,
      states: c.floatsIn(states, 'states', options.dim),
      energy: c.energyIn(options.energy),
      returnGradient: Boolean(options.gradient),
      queueTimeoutMs: options.queueTimeoutMs,
      filter: c.filterIn(options.filter),
      returnNovelty: Boolean(options.novelty),
    }, options);
    return {
      energies: reply.energies,
      gradients: options.gradient ? c.floatsOut(reply.gradients) : null,
      values: c.optionalFloatsOut(reply.values),
      novelty: options.novelty ? c.optionalDoublesOut(reply.novelty) : null,
      noveltyZ: options.novelty ? c.optionalDoublesOut(reply.noveltyZ) : null,
    };
  }

  /**
   * Diffusion-style sampling whose score is the bank's own energy.
   * @param {string} bank the bank
   * @param {object} [options] SampleRequest fields in camelCase: count,
   *   energy, sampler ("euler", "heun", "stochastic", "langevin",
   *   "annealed_am"), schedule {kind ("karras", "geometric", "linear"),
   *   sigmaMax, sigmaMin, rho, steps, stopAtSigmaMin}, seed, query (N or
   *   count * N floats), sigmaStart, clamp, churn, sTmin, sTmax, sNoise,
   *   langevinSteps, langevinEta, amIterations, deltaMemorized,
   *   deltaSpurious, trajectoryEvery, queueTimeoutMs, filter (as for
   *   retrieve: sample from the passing memories only); plus timeoutMs
   * @returns {Promise<object>} the SampleResponse: {samples, sigmas, steps},
   *   each sample's `state` a Float32Array; rejects FAILED_PRECONDITION
   *   when no pattern passes the filter
   */
  async sample(bank, options = {}) {
    return c.sampleResponseOut(await this._unary('Sample', sampleRequest(bank, options), options));
  }

  /**
   * Sampling as sample(), streaming every sample's state as it forms.
   *
   * Returns an async iterator of frames {step, sigma, states, result}:
   * `states` is a Float32Array of count * N floats, and the last frame's
   * `result` holds the whole SampleResponse (null on the other frames).
   * Leaving a `for await` loop early cancels the call; so does `cancel()`,
   * after which the iteration ends without an error. The call is retried on
   * UNAVAILABLE only before its first frame.
   * @param {string} bank the bank
   * @param {object} [options] as for sample()
   * @returns {AsyncGenerator<object, void, undefined> & {cancel(): void}}
   *   the frames; iteration throws an EngramError when the call fails
   */
  sampleStream(bank, options = {}) {
    const client = this;
    let call = null;
    let cancelled = false;
    async function* frames() {
      const request = sampleRequest(bank, options);
      let attempts = 0;
      let received = 0;
      try {
        for (;;) {
          if (cancelled) return;
          attempts++;
          client._checkOpen('SampleStream', attempts - 1);
          try {
            call = client._stub.SampleStream(request, client._metadata(), client._callOptions(options));
          } catch (e) {
            throw EngramError.fromGrpc(e, 'SampleStream', attempts);
          }
          const reader = new StreamReader(call);
          try {
            for (;;) {
              const frame = await reader.next();
              if (frame === undefined) return;
              received++;
              yield c.frameOut(frame);
            }
          } catch (e) {
            if (cancelled) return;
            if (received === 0 && client._shouldRetry(e, attempts)) {
              await sleep(client._backoff(attempts));
              continue;
            }
            throw EngramError.fromGrpc(e, 'SampleStream', attempts);
          }
        }
      } finally {
        if (call) call.cancel();
      }
    }
    const iterator = frames();
    iterator.cancel = () => {
      cancelled = true;
      if (call) call.cancel();
    };
    return iterator;
  }

  // -------------------------------------------------------------------------
  // Operations

  /**
   * Writes a consistent snapshot of every bank to <data_dir>/backups/<file>
   * on the server.
   * @param {string} file file name, [a-z0-9][a-z0-9_.-]{0,63}
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<{path: string, bytes: number, banks: number}>} where
   *   the snapshot was written; rejects ALREADY_EXISTS if the file exists
   */
  async backup(file, options = {}) {
    const reply = await this._unary('Backup', { file }, options);
    return { path: reply.path, bytes: Number(reply.bytes), banks: reply.banks };
  }

  // -------------------------------------------------------------------------
  // Internals

  /** Call metadata: the bearer token when one is set. */
  _metadata() {
    const metadata = new grpc.Metadata();
    if (this._token !== null) metadata.set('authorization', `Bearer ${this._token}`);
    return metadata;
  }

  /** gRPC call options: the deadline of one attempt. */
  _callOptions(options) {
    const timeoutMs = options && options.timeoutMs !== undefined ? options.timeoutMs : this._timeoutMs;
    return timeoutMs > 0 && Number.isFinite(timeoutMs) ? { deadline: new Date(Date.now() + timeoutMs) } : {};
  }

  /** Throws CANCELLED once the client is closed. */
  _checkOpen(method, attempts) {
    if (this._closed) {
      throw new EngramError(grpc.status.CANCELLED, 'the client is closed', { method, attempts });
    }
  }

  /** True when a call that failed with `err` on attempt `attempts` is retried. */
  _shouldRetry(err, attempts) {
    return !this._closed && err && err.code === grpc.status.UNAVAILABLE && attempts <= this._retries;
  }

  /** Milliseconds to wait before retry number `retry` (1-based). */
  _backoff(retry) {
    const d = Math.min(this._maxBackoffMs, this._backoffMs * 2 ** (retry - 1));
    return d / 2 + Math.random() * (d / 2);
  }

  /** Runs one unary RPC with the retry policy; resolves to the reply message. */
  async _unary(method, request, options) {
    for (let attempts = 1; ; attempts++) {
      this._checkOpen(method, attempts - 1);
      try {
        return await new Promise((resolve, reject) => {
          this._stub[method](request, this._metadata(), this._callOptions(options),
            (err, reply) => (err ? reject(err) : resolve(reply)));
        });
      } catch (err) {
        if (!this._shouldRetry(err, attempts)) throw EngramError.fromGrpc(err, method, attempts);
        await sleep(this._backoff(attempts));
      }
    }
  }
}

/** The SampleRequest of sample() / sampleStream() options. */
function sampleRequest(bank, o) {
  const schedule = o.schedule || {};
  return {
    bank,
    count: o.count,
    energy: c.energyIn(o.energy),
    sampler: c.enumIn('Sampler', o.sampler),
    schedule: o.schedule ? {
      kind: c.enumIn('ScheduleKind', schedule.kind),
      sigmaMax: schedule.sigmaMax,
      sigmaMin: schedule.sigmaMin,
      rho: schedule.rho,
      steps: schedule.steps,
      stopAtSigmaMin: schedule.stopAtSigmaMin,
    } : undefined,
    seed: c.optionalUint64In(o.seed, 'seed'),
    query: c.floatsIn(o.query, 'query', o.dim),
    sigmaStart: o.sigmaStart,
    clamp: c.boolsIn(o.clamp, 'clamp'),
    churn: o.churn,
    sTmin: o.sTmin,
    sTmax: o.sTmax,
    sNoise: o.sNoise,
    langevinSteps: o.langevinSteps,
    langevinEta: o.langevinEta,
    amIterations: o.amIterations,
    deltaMemorized: o.deltaMemorized,
    deltaSpurious: o.deltaSpurious,
    trajectoryEvery: o.trajectoryEvery,
    queueTimeoutMs: o.queueTimeoutMs,
    filter: c.filterIn(o.filter),
  };
}

module.exports = { Client, DEFAULTS };
