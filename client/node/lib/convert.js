'use strict';
// Conversions between the client's JavaScript values and engram.v1 messages
// as @grpc/proto-loader represents them (camelCase fields, uint64 as decimal
// strings, enums by proto name, bytes as Buffer).

const { load } = require('./proto');
const { argumentError } = require('./errors');

const UINT64_MAX = (1n << 64n) - 1n;
const INT64_MIN = -(1n << 63n);
const INT64_MAX = (1n << 63n) - 1n;

/**
 * The prefix of every value name of an engram.v1 enum: "StateKind" →
 * "STATE_KIND_".
 * @param {string} type enum name
 * @returns {string}
 */
function enumPrefix(type) {
  return type.replace(/([a-z0-9])([A-Z])/g, '$1_$2').toUpperCase() + '_';
}

/** The name → number map of an engram.v1 enum. */
function enumValues(type) {
  const values = load().enums[type];
  if (!values) throw new TypeError(`engram-client: no enum engram.v1.${type}`);
  return values;
}

/**
 * Converts an enum value to its proto name. Accepts the lowercase short name
 * ("continuous", "bit_packed"; "-" may stand for "_"), the short name in any
 * case, the proto name ("STATE_KIND_CONTINUOUS") or the enum number.
 * @param {string} type engram.v1 enum name, e.g. "StateKind"
 * @param {string|number} value the value to convert
 * @returns {string|number} the proto name, or the number as given
 * @throws {import('./errors').EngramError} INVALID_ARGUMENT for an unknown name
 */
function toProtoEnum(type, value) {
  const values = enumValues(type);
  if (typeof value === 'number' && Number.isInteger(value)) return value;
  if (typeof value === 'string') {
    const upper = value.trim().toUpperCase().replace(/-/g, '_');
    if (Object.prototype.hasOwnProperty.call(values, upper)) return upper;
    const full = enumPrefix(type) + upper;
    if (Object.prototype.hasOwnProperty.call(values, full)) return full;
  }
  const prefix = enumPrefix(type);
  const names = Object.keys(values).map((n) => n.slice(prefix.length).toLowerCase());
  throw argumentError(`unknown ${type} ${JSON.stringify(value)} (one of ${names.join(', ')})`);
}

/**
 * Converts a proto enum name to the client's lowercase short name:
 * "STOP_REASON_CONVERGED" → "converged". Numbers the proto does not name
 * (a newer server) are returned as they are.
 * @param {string} type engram.v1 enum name, e.g. "StopReason"
 * @param {string|number} value the proto name or number
 * @returns {string|number}
 */
function fromProtoEnum(type, value) {
  const prefix = enumPrefix(type);
  if (typeof value === 'number') {
    const values = enumValues(type);
    const name = Object.keys(values).find((n) => values[n] === value);
    return name === undefined ? value : name.slice(prefix.length).toLowerCase();
  }
  return value.startsWith(prefix) ? value.slice(prefix.length).toLowerCase() : value;
}

/** Optional enum in a request: undefined / null leave the field unset. */
function enumIn(type, value) {
  return value === undefined || value === null ? undefined : toProtoEnum(type, value);
}

/**
 * A uint64 for a request, as a decimal string.
 * @param {bigint|number|string} value a non-negative integer below 2^64
 *   (numbers must be safe integers)
 * @param {string} what the argument's name, for the error message
 * @returns {string}
 */
function uint64In(value, what) {
  let big;
  if (typeof value === 'bigint') {
    big = value;
  } else if (typeof value === 'number') {
    if (!Number.isSafeInteger(value)) {
      throw argumentError(`${what}: ${value} is not a safe integer (pass a bigint or a decimal string)`);
    }
    big = BigInt(value);
  } else if (typeof value === 'string' && /^[0-9]+$/.test(value)) {
    big = BigInt(value);
  } else {
    throw argumentError(`${what}: ${String(value)} is not an unsigned integer`);
  }
  if (big < 0n || big > UINT64_MAX) throw argumentError(`${what}: ${big} is outside [0, 2^64 - 1]`);
  return big.toString();
}

/** An optional uint64: undefined / null leave the field unset. */
function optionalUint64In(value, what) {
  return value === undefined || value === null ? undefined : uint64In(value, what);
}

/** A list of uint64 for a request. */
function uint64ListIn(values, what) {
  if (values === undefined || values === null) return [];
  if (!isIterable(values) || typeof values === 'string') throw argumentError(`${what}: expected an array of ids`);
  return Array.from(values, (v, i) => uint64In(v, `${what}[${i}]`));
}

/** True for arrays, typed arrays and other iterable objects. */
function isIterable(x) {
  return x !== null && typeof x === 'object' && typeof x[Symbol.iterator] === 'function';
}

/**
 * Flattens a batch of vectors to the row-major float list of the proto.
 * Accepts a flat Float32Array / Float64Array / number[] (B * N values) or
 * rows (number[][] or an array of typed arrays), which must all have one
 * length. With `dim`, checks that the batch is a whole number of rows of
 * that dimension.
 * @param {ArrayLike<number>|ArrayLike<ArrayLike<number>>} batch the vectors
 * @param {string} what the argument's name, for error messages
 * @param {number} [dim] the expected dimension N
 * @returns {number[]} B * N numbers
 */
function floatsIn(batch, what, dim) {
  if (batch === undefined || batch === null) return [];
  if (ArrayBuffer.isView(batch)) {
    const flat = Array.from(batch);
    checkDim(flat.length, what, dim);
    return flat;
  }
  if (!Array.isArray(batch)) throw argumentError(`${what}: expected a Float32Array or an array of numbers or rows`);
  if (batch.length === 0) return [];
  if (typeof batch[0] === 'number') {
    for (let i = 0; i < batch.length; i++) {
      if (typeof batch[i] !== 'number') throw argumentError(`${what}[${i}] is not a number`);
    }
    checkDim(batch.length, what, dim);
    return batch;
  }
  const width = batch[0] && batch[0].length;
  if (typeof width !== 'number') throw argumentError(`${what}: expected numbers or rows of numbers`);
  if (dim !== undefined && width !== dim) {
    throw argumentError(`${what}: rows have ${width} values, the bank's dimension is ${dim}`);
  }
  const flat = new Array(batch.length * width);
  for (let r = 0; r < batch.length; r++) {
    const row = batch[r];
    if (!row || row.length !== width) {
      throw argumentError(`${what}: row ${r} has ${row ? row.length : 0} values, row 0 has ${width}`);
    }
    for (let c = 0; c < width; c++) {
      const v = row[c];
      if (typeof v !== 'number') throw argumentError(`${what}[${r}][${c}] is not a number`);
      flat[r * width + c] = v;
    }
  }
  return flat;
}

/** Checks that `length` floats are whole vectors of dimension `dim` (when given). */
function checkDim(length, what, dim) {
  if (dim !== undefined && (!Number.isInteger(dim) || dim <= 0 || length % dim !== 0)) {
    throw argumentError(`${what}: ${length} values are not a whole number of vectors of dimension ${dim}`);
  }
}

/** Packed floats of a response as a Float32Array. */
function floatsOut(values) {
  return Float32Array.from(values || []);
}

/** Packed floats of a response as a Float32Array; null when there are none. */
function optionalFloatsOut(values) {
  return values && values.length > 0 ? Float32Array.from(values) : null;
}

/** Packed doubles of a response as a Float64Array; null when there are none. */
function optionalDoublesOut(values) {
  return values && values.length > 0 ? Float64Array.from(values) : null;
}

/** A clamp mask for a request: any array-like of truthy / falsy values. */
function boolsIn(mask, what) {
  if (mask === undefined || mask === null) return [];
  if (!Array.isArray(mask) && !ArrayBuffer.isView(mask)) throw argumentError(`${what}: expected an array of booleans`);
  return Array.from(mask, Boolean);
}

/** Payloads for a request: Buffers, Uint8Arrays or strings (UTF-8). */
function bytesListIn(payloads, what) {
  if (payloads === undefined || payloads === null) return [];
  if (!Array.isArray(payloads)) throw argumentError(`${what}: expected an array`);
  return payloads.map((p, i) => {
    if (typeof p === 'string') return Buffer.from(p, 'utf8');
    if (p instanceof Uint8Array) return Buffer.from(p.buffer, p.byteOffset, p.byteLength);
    throw argumentError(`${what}[${i}]: expected a Buffer, Uint8Array or string`);
  });
}

/** True for {...} literals and Object.create(null), not for arrays, Maps, Dates, ... */
function isPlainObject(x) {
  if (x === null || typeof x !== 'object') return false;
  const proto = Object.getPrototypeOf(x);
  return proto === Object.prototype || proto === null;
}

/** True for a bigint or a safe integer number. */
function isInteger(x) {
  return typeof x === 'bigint' || Number.isSafeInteger(x);
}

/** A value for an error message: strings quoted, bigints with their n. */
function show(x) {
  if (typeof x === 'bigint') return `${x}n`;
  if (typeof x === 'string') return JSON.stringify(x);
  if (Array.isArray(x)) return 'an array';
  return x !== null && typeof x === 'object' ? 'an object' : String(x);
}

/**
 * An int64 for a request, as a decimal string.
 * @param {bigint|number} value a bigint or a safe integer
 * @param {string} what the argument's name, for the error message
 * @returns {string}
 * @throws {TypeError} for anything else; {RangeError} outside int64
 */
function int64In(value, what) {
  if (!isInteger(value)) {
    throw new TypeError(`engram-client: ${what} must be an integer (a safe integer number or a bigint), got ${show(value)}`);
  }
  const big = BigInt(value);
  if (big < INT64_MIN || big > INT64_MAX) throw new RangeError(`engram-client: ${what}: ${big} is outside int64`);
  return big.toString();
}

/**
 * The Labels messages of store(): one plain object per pattern (null or
 * undefined for none), string values as string labels, integers (safe
 * numbers or bigints) as int64 labels.
 * @param {Array<object|null|undefined>|undefined} labels
 * @returns {Array<{strings: object, ints: object}>}
 * @throws {TypeError} for a value of any other type
 */
function labelsIn(labels) {
  if (labels === undefined || labels === null) return [];
  if (!Array.isArray(labels)) throw new TypeError('engram-client: labels must be an array of objects, one per pattern');
  return labels.map((l, i) => {
    if (l === undefined || l === null) return { strings: {}, ints: {} };
    if (!isPlainObject(l)) throw new TypeError(`engram-client: labels[${i}] must be a plain object, got ${show(l)}`);
    const strings = [];
    const ints = [];
    for (const [key, v] of Object.entries(l)) {
      if (typeof v === 'string') strings.push([key, v]);
      else if (typeof v === 'number' || typeof v === 'bigint') ints.push([key, int64In(v, `labels[${i}].${key}`)]);
      else throw new TypeError(`engram-client: labels[${i}].${key} must be a string or an integer, got ${show(v)}`);
    }
    // fromEntries: a key such as "__proto__" stays an own property.
    return { strings: Object.fromEntries(strings), ints: Object.fromEntries(ints) };
  });
}

/** The labels of one pattern of a response: one object, int labels as bigints. */
function labelsOut(l) {
  return Object.fromEntries([
    ...Object.entries((l && l.strings) || {}),
    ...Object.entries((l && l.ints) || {}).map(([k, v]) => [k, BigInt(v)]),
  ]);
}

/**
 * The engram.v1.Filter message of a filter object: one condition per key,
 * ANDed. Each key's test is
 *   "en"                       equals (a string label)
 *   7 or 7n                    int_equals (an integer label)
 *   ["a", "b"]                 any_of (non-empty, all strings)
 *   [1, 2n]                    int_any_of (non-empty, all integers)
 *   {min: 2000, max: 2009}     int_range, inclusive; a missing bound is open
 * Integers are safe numbers or bigints and travel as decimal strings, so the
 * message is also the proto3 JSON of the HTTP gateway.
 * @param {object|undefined} filter
 * @returns {{conditions: object[]}|undefined}
 * @throws {TypeError} for a test of no such form; {RangeError} for an integer outside int64
 */
function filterIn(filter) {
  if (filter === undefined || filter === null) return undefined;
  if (!isPlainObject(filter)) throw new TypeError('engram-client: filter must be a plain object {label: test, ...}');
  return { conditions: Object.entries(filter).map(([key, test]) => conditionIn(key, test)) };
}

/** One Condition of filterIn(). */
function conditionIn(key, test) {
  const what = `filter.${key}`;
  if (typeof test === 'string') return { key, equals: test };
  if (typeof test === 'number' || typeof test === 'bigint') return { key, intEquals: int64In(test, what) };
  if (Array.isArray(test) && test.length > 0) {
    if (test.every((v) => typeof v === 'string')) return { key, anyOf: { values: test.slice() } };
    if (test.every((v) => typeof v === 'number' || typeof v === 'bigint')) {
      return { key, intAnyOf: { values: test.map((v, i) => int64In(v, `${what}[${i}]`)) } };
    }
  }
  if (isPlainObject(test)) {
    const keys = Object.keys(test).filter((k) => test[k] !== undefined);
    if (keys.length > 0 && keys.every((k) => k === 'min' || k === 'max')) {
      return {
        key,
        intRange: {
          min: test.min === undefined ? INT64_MIN.toString() : int64In(test.min, `${what}.min`),
          max: test.max === undefined ? INT64_MAX.toString() : int64In(test.max, `${what}.max`),
        },
      };
    }
  }
  throw new TypeError(`engram-client: ${what} must be a string, an integer, a non-empty array of strings or of ` +
    `integers, or {min, max}; got ${show(test)}`);
}

/**
 * An EnergyConfig for a request. A string is shorthand for {family}.
 * @param {object|string|undefined} energy
 * @returns {object|undefined}
 */
function energyIn(energy) {
  if (energy === undefined || energy === null) return undefined;
  if (typeof energy === 'string' || typeof energy === 'number') energy = { family: energy };
  if (typeof energy !== 'object') throw argumentError('energy: expected an object or a family name');
  return {
    family: enumIn('EnergyFamily', energy.family),
    degree: energy.degree,
    rectified: energy.rectified,
    beta: energy.beta,
    similarity: enumIn('Similarity', energy.similarity),
    separation: enumIn('Separation', energy.separation),
  };
}

/** An EnergyConfig of a response, enums as short names; null when unset. */
function energyOut(e) {
  if (!e) return null;
  return {
    family: fromProtoEnum('EnergyFamily', e.family),
    degree: e.degree,
    rectified: e.rectified,
    beta: e.beta,
    similarity: fromProtoEnum('Similarity', e.similarity),
    separation: fromProtoEnum('Separation', e.separation),
  };
}

/** A BankInfo of a response; counts as numbers. */
function bankOut(b) {
  return {
    name: b.name,
    dim: b.dim,
    kind: fromProtoEnum('StateKind', b.kind),
    energy: energyOut(b.energy),
    precision: fromProtoEnum('Precision', b.precision),
    valueDim: b.valueDim,
    ttlSeconds: Number(b.ttlSeconds),
    decayHalfLifeSeconds: Number(b.decayHalfLifeSeconds),
    patterns: Number(b.patterns),
    bytes: Number(b.bytes),
    load: b.load,
    capacity: b.capacity ? {
      patterns: b.capacity.patterns,
      exactPatterns: b.capacity.exactPatterns,
      formula: b.capacity.formula,
      overCapacity: b.capacity.overCapacity,
    } : null,
  };
}

/** A Memory of a response, its id a bigint; null when unset. */
function memoryOut(m) {
  if (!m) return null;
  return { id: BigInt(m.id), payload: m.payload, distance: m.distance, similarity: m.similarity };
}

/** A RetrieveResult of a response, its state a Float32Array. */
function retrieveResultOut(r) {
  return {
    state: floatsOut(r.state),
    nearest: memoryOut(r.nearest),
    energyStart: r.energyStart,
    energyEnd: r.energyEnd,
    energyTrace: r.energyTrace,
    steps: r.steps,
    converged: r.converged,
    stopReason: fromProtoEnum('StopReason', r.stopReason),
    lyapunovViolations: r.lyapunovViolations,
    value: optionalFloatsOut(r.value),
  };
}

/** A SampleResponse, its states Float32Arrays; null when unset. */
function sampleResponseOut(s) {
  if (!s) return null;
  return {
    samples: s.samples.map((x) => ({
      state: floatsOut(x.state),
      nearest: memoryOut(x.nearest),
      mirrored: x.mirrored,
      relativeDistance: x.relativeDistance,
      sampleClass: fromProtoEnum('SampleClass', x.sampleClass),
      fixedPoint: x.fixedPoint,
      spuriousFixedPoint: x.spuriousFixedPoint,
      energy: x.energy,
      trajectory: x.trajectory.map((t) => ({ step: t.step, sigma: t.sigma, state: floatsOut(t.state) })),
    })),
    sigmas: s.sigmas,
    steps: s.steps,
  };
}

/** A SampleFrame, its states a Float32Array. */
function frameOut(f) {
  return { step: f.step, sigma: f.sigma, states: floatsOut(f.states), result: sampleResponseOut(f.result) };
}

module.exports = {
  enumPrefix, toProtoEnum, fromProtoEnum, enumIn,
  uint64In, optionalUint64In, uint64ListIn,
  floatsIn, floatsOut, optionalFloatsOut, optionalDoublesOut, boolsIn, bytesListIn,
  int64In, labelsIn, labelsOut, filterIn,
  energyIn, energyOut, bankOut, memoryOut, retrieveResultOut, sampleResponseOut, frameOut,
};
